//! The decode stage's libjpeg driver: a JPEG to RGB8 in PIL's settings (integer IDCT, fancy
//! upsampling; CMYK converted as PIL converts it), at a DCT scale of k/8, and only the part of
//! the image the resize reads.
//!
//! libjpeg-turbo can leave out most of the work outside a rectangle: `jpeg_crop_scanline`
//! runs the inverse DCT, upsampling and colour conversion only on the columns asked for,
//! `jpeg_skip_scanlines` does the same for rows above and below them. The Huffman decoding of
//! every row still runs (above and beside it cannot be skipped; below it could, but then
//! damage there that stops PIL's decode would go unseen), so the saving is the rest of the
//! decode, outside the rectangle. A progressive file is entropy-decoded whole when the decode starts, and its
//! columns are not cropped (block smoothing, see [`decode`]).
//!
//! The pixels inside equal the whole decode's: fancy upsampling of subsampled chroma reads
//! one chroma sample past each output pixel, and at the edge of a cropped or skipped region
//! libjpeg repeats the edge sample instead, so [`MARGIN`] more pixels are decoded on each side
//! (and libjpeg moves the left edge further, to a block boundary). Unit tests compare every
//! subsampling, baseline and progressive files (one cut short after some scans), DCT scales
//! and random rectangles with the whole decode.

use std::ops::Range;

use mozjpeg_sys as ffi;

/// Pixels decoded past each side of the wanted rectangle (see the module documentation; one
/// is enough for 2× subsampled chroma, the tests show).
const MARGIN: u32 = 2;

/// Pixels of a JPEG decoded by [`decode`]: `rgb` holds the `w × h` pixels from `(x, y)` on
/// (`held = [x, y, w, h]`) of the image decoded at the asked scale, which is `size` large.
pub(super) struct Part {
    pub rgb: Vec<u8>,
    pub size: (u32, u32),
    pub held: [u32; 4],
}

/// Decodes `bytes` at `k`/8 of its size (`k` in 1..=8) into RGB8, only the columns and rows
/// that `want` names (given the scaled size; `None`: all of it) and a margin.
///
/// A fatal libjpeg error unwinds out of here (the caller catches it); warnings are counted in
/// [`LIBJPEG_WARNINGS`]. `Err` where libjpeg stops short without an error.
pub(super) fn decode(
    bytes: &[u8],
    k: u8,
    want: impl FnOnce((u32, u32)) -> Option<(Range<u32>, Range<u32>)>,
) -> Result<Part, &'static str> {
    // Declared before the session, so dropped after it: libjpeg holds pointers to them.
    let mut err = Box::new(libjpeg_errors());
    // SAFETY (this block and the calls below): jpeg_decompress_struct is plain C data, valid
    // zeroed before jpeg_create_decompress fills it; the error manager and the input bytes
    // outlive the session; each call comes in the order libjpeg's API requires, and every row
    // pointer handed to jpeg_read_scanlines points at `output_width * output_components`
    // writable bytes (3 for RGB, 4 for the CMYK row buffer, both sized after the crop).
    let mut progress = Box::new(scan_limit());
    let mut s = Session(Box::new(unsafe { std::mem::zeroed() }));
    s.0.common.err = &mut *err;
    unsafe { ffi::jpeg_create_decompress(&mut *s.0) };
    // After the create, which clears every field but the error manager.
    s.0.common.progress = &mut *progress;
    let c = &mut *s.0;
    unsafe { ffi::jpeg_mem_src(c, bytes.as_ptr(), bytes.len() as _) };
    if unsafe { ffi::jpeg_read_header(c, 1) } != 1 {
        return Err("no image in the JPEG data");
    }
    // A 4-channel file (CMYK, or YCCK, which libjpeg turns into CMYK) is read as CMYK and
    // converted as PIL does; everything else libjpeg turns into RGB itself.
    let cmyk = matches!(c.jpeg_color_space, ffi::J_COLOR_SPACE::JCS_CMYK | ffi::J_COLOR_SPACE::JCS_YCCK);
    let channels = if cmyk { 4 } else { 3 };
    c.out_color_space = if cmyk { ffi::J_COLOR_SPACE::JCS_CMYK } else { ffi::J_COLOR_SPACE::JCS_RGB };
    if k != 8 {
        c.scale_num = k.into();
        c.scale_denom = 8;
    }
    if unsafe { ffi::jpeg_start_decompress(c) } == 0 || c.output_components != channels {
        return Err("libjpeg did not start an RGB or CMYK decode");
    }
    let size = (c.output_width, c.output_height);
    let (cols, rows) = want(size)
        .filter(|(x, y)| !x.is_empty() && !y.is_empty() && x.end <= size.0 && y.end <= size.1)
        .unwrap_or((0..size.0, 0..size.1));
    let mut x = cols.start.saturating_sub(MARGIN);
    let mut w = (cols.end + MARGIN).min(size.0) - x;
    // Not for a progressive file: where its coefficients are not fully refined, libjpeg's
    // block smoothing reads the blocks left of a crop as copies of its first one, which changes
    // the pixels there. (Such a file is entropy-decoded whole at the start anyway.) libjpeg's
    // own record says which it is: its progression table `coef_bits`, which
    // jpeg_start_decompress allocates for a progressive file only and block smoothing needs.
    let progressive = !c.coef_bits.is_null();
    if w < size.0 && !progressive {
        // Moves `x` left to a block boundary and widens `w` to match.
        unsafe { ffi::jpeg_crop_scanline(c, &mut x, &mut w) };
    } else {
        x = 0; // every column
    }
    let (y0, y1) = (rows.start.saturating_sub(MARGIN), (rows.end + MARGIN).min(size.1));
    if y0 > 0 && unsafe { ffi::jpeg_skip_scanlines(c, y0) } != y0 {
        return Err("libjpeg skipped fewer rows than asked");
    }
    let row_len = c.output_width as usize * 3;
    let mut rgb = vec![0u8; row_len * (y1 - y0) as usize];
    let mut cmyk_row = vec![0u8; if cmyk { c.output_width as usize * 4 } else { 0 }];
    for row in rgb.chunks_exact_mut(row_len) {
        let mut ptr = if cmyk { cmyk_row.as_mut_ptr() } else { row.as_mut_ptr() };
        if unsafe { ffi::jpeg_read_scanlines(c, &mut ptr, 1) } != 1 {
            return Err("libjpeg returned no row");
        }
        if cmyk {
            cmyk_to_rgb(&cmyk_row, row);
        }
    }
    // The rows below are entropy-decoded but not transformed: all but the last skipped, the
    // last read. (Skipping them all would skip their data and the markers after it: libjpeg
    // then takes the image as ended, and corrupt data there that stops PIL's decode, which reads
    // every row, would go unseen.)
    if y1 < size.1 {
        let below = size.1 - y1;
        if below > 1 && unsafe { ffi::jpeg_skip_scanlines(c, below - 1) } != below - 1 {
            return Err("libjpeg skipped fewer rows than asked");
        }
        let mut last = vec![0u8; c.output_width as usize * channels as usize];
        let mut ptr = last.as_mut_ptr();
        if unsafe { ffi::jpeg_read_scanlines(c, &mut ptr, 1) } != 1 {
            return Err("libjpeg returned no row");
        }
    }
    if unsafe { ffi::jpeg_finish_decompress(c) } == 0 {
        return Err("libjpeg did not finish");
    }
    Ok(Part { rgb, size, held: [x, y0, c.output_width, y1 - y0] })
}

/// PIL's RGB of a row of CMYK as libjpeg returns it (`cmyk`, 4 bytes a pixel) into `rgb` (3 a
/// pixel). PIL reads every CMYK JPEG as Adobe writes them, inverted (its raw mode `CMYK;I`),
/// and its `convert("RGB")` takes `nk − c·nk/255`, rounded its own way, with `nk = 255 − k`.
/// In the stored (inverted) values `nk` is the stored K and `c` is `255 −` the stored C.
pub(super) fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (p, out) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        let nk = p[3] as u32;
        for (o, &v) in out.iter_mut().zip(&p[..3]) {
            // Pillow's MULDIV255(a, b): (t + (t >> 8)) >> 8 with t = a * b + 128.
            let t = (255 - v as u32) * nk + 128;
            *o = (nk - ((t + (t >> 8)) >> 8)) as u8;
        }
    }
}

/// Frees libjpeg's state however a decode ends, unwinding included.
struct Session(Box<ffi::jpeg_decompress_struct>);

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: created by jpeg_create_decompress and destroyed only here.
        unsafe { ffi::jpeg_destroy_decompress(&mut self.0) };
    }
}

/// A JPEG's header as libjpeg reads it: its size, its EXIF data (the TIFF structure after
/// `Exif\0\0` in the APP1 segments that hold one, joined as PIL joins them) and its XMP packet (the last APP1
/// segment that holds one), as PIL takes them. `None` where there is no image; a fatal libjpeg
/// error (a header it cannot decode) unwinds, as in [`decode`].
#[allow(clippy::type_complexity)]
pub(super) fn header(bytes: &[u8]) -> Option<(u32, u32, Option<Vec<u8>>, Option<Vec<u8>>)> {
    let mut err = Box::new(libjpeg_errors());
    // SAFETY: as in `decode`; the marker list is libjpeg's, valid until the session ends, and
    // each marker's `data` holds `data_length` bytes.
    let mut s = Session(Box::new(unsafe { std::mem::zeroed() }));
    s.0.common.err = &mut *err;
    unsafe { ffi::jpeg_create_decompress(&mut *s.0) };
    let c = &mut *s.0;
    unsafe { ffi::jpeg_mem_src(c, bytes.as_ptr(), bytes.len() as _) };
    unsafe { ffi::jpeg_save_markers(c, 0xE1, 0xFFFF) };
    if unsafe { ffi::jpeg_read_header(c, 1) } != 1 {
        return None;
    }
    let (mut exif, mut xmp) = (None, None);
    let mut m = c.marker_list;
    while !m.is_null() {
        let marker = unsafe { &*m };
        let data: &[u8] = match marker.data.is_null() {
            true => &[],
            false => unsafe { std::slice::from_raw_parts(marker.data, marker.data_length as usize) },
        };
        // A block split over several segments: PIL joins them.
        if marker.marker == 0xE1 && data.starts_with(b"Exif\0\0") {
            exif.get_or_insert_with(Vec::new).extend_from_slice(&data[6..]);
        }
        if let Some(packet) = data.strip_prefix(b"http://ns.adobe.com/xap/1.0/\0".as_slice()) {
            xmp = Some(packet.to_vec());
        }
        m = marker.next;
    }
    Some((c.image_width, c.image_height, exif, xmp))
}

thread_local! {
    /// Warnings libjpeg gave on this thread since the counter was last reset.
    pub(super) static LIBJPEG_WARNINGS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Scans a JPEG may have before libjpeg gives up on it (as libjpeg-turbo's `djpeg -maxscans`
/// does; the image crate's decoder, the fallback, refuses more than 100 too). A progressive
/// file of thousands of tiny scans is small on disk but entropy-decodes the whole image once a
/// scan: seconds to minutes of a decode thread.
const MAX_SCANS: i32 = 100;

/// libjpeg's progress monitor for [`decode`]: stops the decode (as a fatal error) past
/// [`MAX_SCANS`] scans.
fn scan_limit() -> ffi::jpeg_progress_mgr {
    unsafe extern "C-unwind" fn monitor(common: &mut ffi::jpeg_common_struct) {
        if common.is_decompressor == 0 {
            return;
        }
        // SAFETY: a decompressor's common fields are the first of its jpeg_decompress_struct;
        // the field is read through the pointer to the whole struct.
        let d = (common as *mut ffi::jpeg_common_struct).cast::<ffi::jpeg_decompress_struct>();
        if unsafe { std::ptr::addr_of!((*d).input_scan_number).read() } > MAX_SCANS {
            std::panic::resume_unwind(Box::new("libjpeg: too many scans"));
        }
    }
    // SAFETY: plain C data, valid zeroed; libjpeg sets the counters.
    let mut p: ffi::jpeg_progress_mgr = unsafe { std::mem::zeroed() };
    p.progress_monitor = Some(monitor);
    p
}

/// A fatal libjpeg error (what unwinds out of [`decode`]), in libjpeg's words.
pub(super) struct Fatal(pub String);

/// libjpeg's error handling for [`decode`]: a fatal error unwinds out of libjpeg (to the
/// `catch_unwind` around it), a warning (corrupt data, which libjpeg decodes around) is counted
/// in [`LIBJPEG_WARNINGS`], trace messages are dropped.
fn libjpeg_errors() -> ffi::jpeg_error_mgr {
    unsafe extern "C-unwind" fn fatal(cinfo: &mut ffi::jpeg_common_struct) {
        // libjpeg's words for it, formatted into JMSG_LENGTH_MAX (200) bytes: the binding's
        // type for the buffer says 80, so the function is called through a pointer type.
        let mut text = [0u8; 200];
        // SAFETY: `err` is the error manager this session was created with; format_message is
        // libjpeg's, which writes a NUL-terminated message of at most 200 bytes to its buffer
        // (a pointer in C: the two function types have the same ABI).
        unsafe {
            if let Some(format) = (*cinfo.err).format_message {
                type Format = unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8);
                let format: Format = std::mem::transmute(format);
                format(cinfo, text.as_mut_ptr());
            }
        }
        let message = std::ffi::CStr::from_bytes_until_nul(&text).map_or(String::new(), |m| m.to_string_lossy().into());
        // Not `panic!`: no panic hook, no message; the caller decides.
        std::panic::resume_unwind(Box::new(Fatal(message)));
    }
    unsafe extern "C-unwind" fn message(_: &mut ffi::jpeg_common_struct, level: std::os::raw::c_int) {
        if level < 0 {
            LIBJPEG_WARNINGS.set(LIBJPEG_WARNINGS.get() + 1);
        }
    }
    // SAFETY: jpeg_error_mgr is plain C data (numbers, pointers, optional fn pointers), for
    // which all zeroes is valid; jpeg_std_error then fills in libjpeg's defaults.
    let mut err: ffi::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { ffi::jpeg_std_error(&mut err) };
    err.error_exit = Some(fatal);
    err.emit_message = Some(message);
    err
}
