//! Decode stage: image file bytes → the RGB8 model-input crop, plus the geometry that maps
//! original-image coordinates (boxes, masks) into that crop. Never touches tch.
//!
//! Pipeline per sample, mirroring torchvision's eval transform on a PIL image:
//! 1. read the file (missing → `missing`, other I/O failure → `unreadable`);
//! 2. sniff the format from the content and read the header; `width * height > max_pixels`
//!    → `too_large` before any pixel is decoded (decompression-bomb guard; for the formats
//!    the image crate decodes, its allocation limits are a second guard);
//! 3. decode (JPEG, PNG, WebP, BMP, TIFF, GIF first frame), convert to RGB8 (grey expanded,
//!    alpha dropped as PIL's `convert("RGB")`, 16-bit colour by its high byte as PIL reads it),
//!    apply the EXIF orientation;
//! 4. resize with antialiased bilinear as PIL computes it, bit for bit (`resample`), and
//!    centre-crop, computing only the pixels inside the crop window.
//!
//! JPEGs are decoded by libjpeg-turbo (the MozJPEG build, with its SIMD code), the library PIL
//! decodes them with, in PIL's settings (integer IDCT, fancy upsampling): the same pixels, bit
//! for bit; corrupt data libjpeg only warns of is decoded around, as PIL keeps it, and data
//! that stops libjpeg is a `decode_error`, as it stops PIL; CMYK (and YCCK) files are read as
//! CMYK and converted to RGB in PIL's arithmetic. A JPEG whose header libjpeg refuses goes to
//! the image crate's decoder instead, which decodes or refuses it.
//!
//! libjpeg decodes only the pixels step 4 reads (`jpeg.rs`): the resize's taps are planned
//! first, and their source rectangle, mapped back through the EXIF orientation, is all that
//! is colour-converted; the rows below it of a baseline file are not even entropy-decoded. So
//! damage in those rows, which PIL would decode around, is not seen, and the crop is PIL's all
//! the same.
//!
//! With `jpeg_dct_scaling`, a JPEG at least twice the resize target is decoded at 1/8 … 4/8
//! of its size straight from the DCT coefficients, the smallest scale that still leaves the
//! image at least as large as the resize target, and step 4 starts from that. Far less work for
//! large photos; pixels differ slightly from the full decode (the DCT scaling is a box-like
//! filter before the bilinear one). Geometry (boxes, masks) stays in the original image's frame.

mod chunks;
mod geometry;
mod jpeg;
mod mask;
mod orient;
mod resample;

#[cfg(test)]
mod tests;

use std::io::Cursor;

use crate::store::{self, Loc};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};

use crate::sample::{SampleError, Status};

pub use geometry::Geometry;
pub use mask::load_mask;

/// How the decoded image is resized before the centre crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// torchvision `Resize(int)`: the shorter side becomes this size, the longer side
    /// `int(size * long / short)`, keeping the aspect ratio.
    ShorterSide(u32),
    /// torchvision `Resize((h, w))`: exactly this size.
    Exact {
        /// Output height.
        h: u32,
        /// Output width.
        w: u32,
    },
}

/// Preprocessing settings of the decode stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocess {
    /// The resize step.
    pub resize: Resize,
    /// Centre crop `(h, w)` after the resize; `None` keeps the whole resized image.
    pub crop: Option<(u32, u32)>,
    /// Largest accepted `width * height` of the stored image (checked from the header before
    /// decoding) and of the output; larger images get status `too_large`.
    pub max_pixels: u64,
    /// Decode large JPEGs at a reduced scale straight from the DCT coefficients (see the module
    /// documentation).
    pub jpeg_dct_scaling: bool,
}

impl Preprocess {
    /// The output (height, width) every image gets, when it does not depend on the image:
    /// the crop, else an exact resize. `None` for a shorter-side resize without a crop.
    pub fn output_size(&self) -> Option<(u32, u32)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Resize::Exact { h, w }) => Some((h, w)),
            (None, Resize::ShorterSide(_)) => None,
        }
    }
}

/// A decoded, resized and cropped image.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// `out_h * out_w * 3` bytes, row-major HWC, RGB.
    pub rgb: Vec<u8>,
    /// How original-image coordinates map into `rgb`'s frame.
    pub geometry: Geometry,
}

/// Reads and decodes the image file at `path` (see [`decode_bytes`]).
///
/// A file that does not exist gives status `missing`; any other failure to read it
/// (permissions, a directory, I/O error) gives `unreadable`; a file larger than any image of
/// `max_pixels` pixels could be (16 bytes a pixel plus 256 MiB) gives `too_large` unread.
/// Messages name the path.
pub fn decode_file(path: impl Into<Loc>, pre: &Preprocess) -> Result<Decoded, SampleError> {
    let path = path.into();
    let bytes = read_file(&path, alloc_limit(pre.max_pixels))?;
    decode_bytes(&bytes, &path.to_string(), pre)
}

/// Decodes an encoded image held in memory; `name` (usually the file path) is used in messages.
///
/// Errors: status `decode_error` for empty input, data that is not an image, an unsupported
/// format, or a truncated/corrupt image; `too_large` when the header's `width * height`
/// exceeds `pre.max_pixels` (checked before the pixels are decoded), when the decoder's
/// allocation limit is hit, or when the output itself would exceed `max_pixels`.
pub fn decode_bytes(bytes: &[u8], name: &str, pre: &Preprocess) -> Result<Decoded, SampleError> {
    if let Some(d) = decode_jpeg(bytes, name, pre)? {
        return Ok(d);
    }
    let (img, format) = decode_oriented(bytes, name, pre.max_pixels, "image", None)?;
    let mut img = into_rgb8(img, format);
    if format == ImageFormat::Bmp {
        bmp16_as_pil(bytes, &mut img);
    }
    let (w, h) = img.dimensions();
    let geometry =
        Geometry::plan(w, h, pre).map_err(|m| SampleError::new(Status::DecodeError, format!("{name}: {m}")))?;
    check_output(&geometry, name, pre)?;
    let region = [0.0, 0.0, w as f64, h as f64];
    let plan = plan_resize((w, h), region, &geometry);
    let pixels = Pixels { rgb: img, size: (w, h), origin: (0, 0) };
    finish(pixels, plan, region, geometry, name)
}

/// PIL's `convert("RGB")` of an image decoded from `format`: grey expanded, alpha dropped;
/// 16-bit colour (with or without alpha, grey with alpha too) of a PNG or TIFF by its high
/// byte, as PIL's raw modes (`RGB;16B` …) read it; a PPM of more than 8 bits rescaled, rounding,
/// as PIL rescales it (and the image crate converts it). 16-bit grey alone is scaled, rounding:
/// PIL opens it as 32-bit integers and clips them at 255, which turns nearly every pixel white.
/// An RGB8 image (the usual one) passes without a copy.
fn into_rgb8(img: DynamicImage, format: ImageFormat) -> image::RgbImage {
    fn high_bytes(w: u32, h: u32, raw: &[u16], channels: usize, grey: bool) -> image::RgbImage {
        let rgb = raw
            .chunks_exact(channels)
            .flat_map(|p| if grey { [p[0]; 3] } else { [p[0], p[1], p[2]] })
            .map(|v| (v >> 8) as u8)
            .collect();
        image::RgbImage::from_raw(w, h, rgb).expect("w × h pixels")
    }
    let (w, h) = (img.width(), img.height());
    match img {
        _ if format == ImageFormat::Pnm => img.into_rgb8(),
        DynamicImage::ImageRgb16(i) => high_bytes(w, h, i.as_raw(), 3, false),
        DynamicImage::ImageRgba16(i) => high_bytes(w, h, i.as_raw(), 4, false),
        DynamicImage::ImageLumaA16(i) => high_bytes(w, h, i.as_raw(), 2, true),
        other => other.into_rgb8(),
    }
}

/// A 16-bit BMP (5-5-5, or 5-6-5 bit fields) with its channels widened to 8 bits as PIL
/// widens them, `v * 255 / max` truncated; the image crate rounds, which is one level above
/// PIL's on about half the values. Other BMPs are left as they are.
fn bmp16_as_pil(bytes: &[u8], img: &mut image::RgbImage) {
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    // A BITMAPINFOHEADER or later (40 bytes or more; the 12-byte OS/2 header holds no bit
    // fields, and its bytes 28.. are pixels) of 16 bits a pixel.
    if u32_at(14).is_none_or(|n| n < 40) || u16_at(28) != Some(16) {
        return;
    }
    let bits: [u32; 3] = match (u32_at(30), u32_at(54), u32_at(58), u32_at(62)) {
        (Some(0), ..) => [5, 5, 5],
        (Some(3), Some(0x7C00), Some(0x03E0), Some(0x001F)) => [5, 5, 5],
        (Some(3), Some(0xF800), Some(0x07E0), Some(0x001F)) => [5, 6, 5],
        _ => return,
    };
    // The image crate's widening of an n-bit value is round(v * 255 / max) for n = 5 and 6:
    // each 8-bit value it gives names one v.
    let tables = bits.map(|n| {
        let max = (1u32 << n) - 1;
        let mut t: [u8; 256] = std::array::from_fn(|x| x as u8);
        for v in 0..=max {
            t[((v * 255 + max / 2) / max) as usize] = (v * 255 / max) as u8;
        }
        t
    });
    for p in img.pixels_mut() {
        for c in 0..3 {
            p.0[c] = tables[c][p.0[c] as usize];
        }
    }
}

/// Decoded pixels: `rgb` holds the pixels from `origin` on of an image of `size` (the
/// original image, or a DCT-scaled one).
struct Pixels {
    rgb: image::RgbImage,
    size: (u32, u32),
    origin: (u32, u32),
}

/// The step-4 check, before any pixel is decoded: the model input itself within `max_pixels`.
fn check_output(geometry: &Geometry, name: &str, pre: &Preprocess) -> Result<(), SampleError> {
    let out_pixels = geometry.out_w as u64 * geometry.out_h as u64;
    if out_pixels > pre.max_pixels {
        return Err(SampleError::new(
            Status::TooLarge,
            format!(
                "{name}: model input {}x{} ({out_pixels} pixels) exceeds the limit of {} pixels",
                geometry.out_w, geometry.out_h, pre.max_pixels
            ),
        ));
    }
    Ok(())
}

/// The resize of step 4 for an image of `size` into `geometry`'s window, where `region`
/// (x0, y0, width, height, in its pixels) is the rectangle of the image that holds the whole
/// original image: all of it, except for a DCT-scaled decode, whose last row and column of
/// pixels cover less than a whole scaled pixel of the original. `None` when no resized pixel
/// lands in the window.
fn plan_resize((w, h): (u32, u32), [rx, ry, rw, rh]: [f64; 4], geometry: &Geometry) -> Option<resample::Plan> {
    let (x0, y0, x1, y1) = geometry.visible_window()?;
    let out = (geometry.resized_w as usize, geometry.resized_h as usize);
    let (cols, rows) = (x0 as usize..x1 as usize, y0 as usize..y1 as usize);
    Some(resample::Plan::new((w as usize, h as usize), [rx, ry, rx + rw, ry + rh], out, cols, rows))
}

/// Step 4 and after: resize and crop `pixels` into `geometry`'s window by `plan` (from
/// [`plan_resize`] with the same `region`).
fn finish(
    pixels: Pixels,
    plan: Option<resample::Plan>,
    region: [f64; 4],
    geometry: Geometry,
    name: &str,
) -> Result<Decoded, SampleError> {
    let rgb = resize_crop(pixels, plan, region, &geometry)
        .map_err(|m| SampleError::new(Status::DecodeError, format!("{name}: {m}")))?;
    Ok(Decoded { rgb, geometry })
}

/// The libjpeg path (at a DCT scale with `jpeg_dct_scaling`): `Ok(None)` when it does not
/// apply (not a JPEG, or one libjpeg refuses), and the caller decodes with the image crate.
/// Damaged data libjpeg decodes around (with warnings) is kept, as PIL keeps it. A JPEG that is
/// too large or truncated gets the same error as on that path.
fn decode_jpeg(bytes: &[u8], name: &str, pre: &Preprocess) -> Result<Option<Decoded>, SampleError> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(None);
    }
    // The header and the EXIF orientation as libjpeg (and so PIL) reads them; a header libjpeg
    // refuses goes to the image crate, which decides and names the error.
    let Ok(Some((w, h, exif, xmp))) = std::panic::catch_unwind(|| jpeg::header(bytes)) else {
        return Ok(None);
    };
    // A broken EXIF block only loses the orientation, as PIL's exif_transpose would.
    let orientation = orient::from_metadata(exif.as_deref(), xmp.as_deref());
    check_header(bytes, ImageFormat::Jpeg, (w, h), pre.max_pixels, "image", name)?;
    let (ow, oh) = oriented_size(w, h, orientation);
    let Ok(geometry) = Geometry::plan(ow, oh, pre) else {
        return Ok(None); // the full path reports it
    };
    // The resize target in the stored (not yet rotated) orientation.
    let (tw, th) = if (ow, oh) == (w, h) {
        (geometry.resized_w, geometry.resized_h)
    } else {
        (geometry.resized_h, geometry.resized_w)
    };
    // libjpeg's scaled size is ceil(side * k / 8). Only scales up to 4/8 are used, so only an
    // image at least twice the target is scaled: at 5/8..7/8 the DCT's own resampling makes
    // the result differ visibly from a full decode's (and saves little time).
    let scaled = |side: u32, k: u32| (side as u64 * k as u64).div_ceil(8) as u32;
    let k = match pre.jpeg_dct_scaling {
        true => (1..=4u32).find(|&k| scaled(w, k) >= tw && scaled(h, k) >= th).unwrap_or(8),
        false => 8,
    };
    check_output(&geometry, name, pre)?;
    // The scaled image (libjpeg's size: ceil(side * k / 8)), in the stored and the oriented
    // frame. The original image covers side * k / 8 scaled pixels of it, from the top-left
    // corner of the stored frame; where that corner lands once the orientation is applied.
    let size = (scaled(w, k), scaled(h, k));
    let oriented = oriented_size(size.0, size.1, orientation);
    let extent = [0.0, 0.0, w as f64 * k as f64 / 8.0, h as f64 * k as f64 / 8.0];
    let [x0, y0, x1, y1] = map_rect(orientation, size, extent);
    let region = [x0, y0, x1 - x0, y1 - y0];
    let plan = plan_resize(oriented, region, &geometry);
    // The pixels the resize reads, in the stored frame: libjpeg decodes only those.
    let want = plan.as_ref().map(|p| {
        let (cols, rows) = p.source();
        let r = [cols.start, rows.start, cols.end, rows.end].map(|v| v as f64);
        let [x0, y0, x1, y1] = map_rect(inverse(orientation), oriented, r).map(|v| v as u32);
        (x0..x1, y0..y1)
    });
    jpeg::LIBJPEG_WARNINGS.set(0);
    let cropped = want.is_some();
    // libjpeg stopped with a fatal error in the data of the whole image: as PIL's does.
    let stopped = |fatal: Box<jpeg::Fatal>| {
        let message = format!("{name}: JPEG data that libjpeg stops at: \"{}\" (PIL's libjpeg stops too)", fatal.0);
        Err(SampleError::new(Status::DecodeError, message))
    };
    let decoded =
        std::panic::catch_unwind(|| jpeg::decode(bytes, k as u8, |got| if got == size { want } else { None }));
    let part = match decoded {
        Ok(Ok(part)) => part,
        // A fatal error after the header (which `jpeg::header` read above). Where the whole
        // image, decoded as PIL decodes it (every row, every column), stops libjpeg too, it is
        // in the data (a marker where none can be, say) and stops PIL's libjpeg as well: the
        // sample's error, not the image crate's to decode (its decoder would go on). Where the
        // whole decode goes through, that is the image. (With nothing to crop, the decode just
        // now was the whole one.)
        Err(payload) if payload.is::<jpeg::Fatal>() && cropped => {
            jpeg::LIBJPEG_WARNINGS.set(0);
            match std::panic::catch_unwind(|| jpeg::decode(bytes, k as u8, |_| None)) {
                Ok(Ok(part)) => part,
                Err(again) => match again.downcast::<jpeg::Fatal>() {
                    Ok(fatal) => return stopped(fatal),
                    Err(_) => return Ok(None),
                },
                Ok(Err(_)) => return Ok(None),
            }
        }
        Err(payload) => match payload.downcast::<jpeg::Fatal>() {
            Ok(fatal) => return stopped(fatal),
            Err(_) => return Ok(None),
        },
        Ok(Err(_)) => return Ok(None),
    };
    let warnings = jpeg::LIBJPEG_WARNINGS.get();
    if warnings > 0 {
        // Damaged data that libjpeg decoded around, as PIL takes it (its pixels are PIL's).
        tracing::warn!("{name}: libjpeg found corrupt data ({warnings} warning(s)) and decoded around it, as PIL does");
    }
    let [hx, hy, hw, hh] = part.held;
    let Some(img) = image::RgbImage::from_raw(hw, hh, part.rgb).filter(|_| part.size == size) else {
        return Ok(None);
    };
    let mut img = DynamicImage::ImageRgb8(img);
    img.apply_orientation(orientation);
    let held = [hx, hy, hx + hw, hy + hh].map(|v| v as f64);
    let [x0, y0, x1, y1] = map_rect(orientation, size, held).map(|v| v as u32);
    let img = img.into_rgb8();
    if img.dimensions() != (x1 - x0, y1 - y0) {
        return Ok(None); // cannot happen; if it did, the image crate's whole decode is right
    }
    let pixels = Pixels { rgb: img, size: oriented, origin: (x0, y0) };
    finish(pixels, plan, region, geometry, name).map(Some)
}

/// The orientation that undoes `o`.
fn inverse(o: Orientation) -> Orientation {
    match o {
        Orientation::Rotate90 => Orientation::Rotate270,
        Orientation::Rotate270 => Orientation::Rotate90,
        // Flips, the half turn and the two transposes undo themselves.
        o => o,
    }
}

/// The rectangle `[x0, x1] × [y0, y1]` of a `sw × sh` image, after `o` is applied to the
/// image (as [`DynamicImage::apply_orientation`] does), as `[x0, y0, x1, y1]`. Pixel edges map
/// to pixel edges, so whole numbers stay whole.
fn map_rect(o: Orientation, (sw, sh): (u32, u32), [x0, y0, x1, y1]: [f64; 4]) -> [f64; 4] {
    #[derive(Clone, Copy)]
    enum Step {
        Rot90,
        Rot180,
        Rot270,
        FlipH,
        FlipV,
    }
    use Step::*;
    let steps: &[Step] = match o {
        Orientation::NoTransforms => &[],
        Orientation::Rotate90 => &[Rot90],
        Orientation::Rotate180 => &[Rot180],
        Orientation::Rotate270 => &[Rot270],
        Orientation::FlipHorizontal => &[FlipH],
        Orientation::FlipVertical => &[FlipV],
        Orientation::Rotate90FlipH => &[Rot90, FlipH],
        Orientation::Rotate270FlipH => &[Rot270, FlipH],
    };
    let (mut size, mut corners) = ((sw as f64, sh as f64), [(x0, y0), (x1, y1)]);
    for &step in steps {
        let (w, h) = size;
        for c in &mut corners {
            let (x, y) = *c;
            // image's rotate90 turns clockwise: pixel (x, y) goes to (h − 1 − y, x).
            *c = match step {
                Rot90 => (h - y, x),
                Rot180 => (w - x, h - y),
                Rot270 => (y, w - x),
                FlipH => (w - x, y),
                FlipV => (x, h - y),
            };
        }
        if matches!(step, Rot90 | Rot270) {
            size = (h, w);
        }
    }
    let [(ax, ay), (bx, by)] = corners;
    [ax.min(bx), ay.min(by), ax.max(bx), ay.max(by)]
}

/// Reads a whole file (local or in an object store), mapping failures to `missing` /
/// `unreadable` with the path in the message. A file longer than `max_bytes` is refused with
/// `too_large` before it is read.
pub(crate) fn read_file(path: &Loc, max_bytes: u64) -> Result<bytes::Bytes, SampleError> {
    store::read(path, Some(max_bytes)).map_err(|e| read_error(path, e))
}

fn read_error(path: &Loc, e: std::io::Error) -> SampleError {
    let status = match e.kind() {
        std::io::ErrorKind::NotFound => Status::Missing,
        std::io::ErrorKind::FileTooLarge => {
            return SampleError::new(Status::TooLarge, format!("{path}: file is {e} for this pixel limit"));
        }
        _ => Status::Unreadable,
    };
    // A store's error starts with the location already.
    let text = e.to_string();
    let text = text.strip_prefix(&format!("{path}: ")).unwrap_or(&text);
    let mut err = SampleError::new(status, format!("{path}: cannot read file: {text}"));
    // A store that times out or fails says nothing about the file (local read errors stay the
    // sample's: a file that cannot be read in place).
    err.transient = matches!(path, Loc::Remote { .. }) && crate::exit::transient(e.kind());
    err
}

/// A PNG's bytes without its iCCP chunks (an embedded colour profile), which nothing here
/// uses and which the PNG decoder would inflate whole before any pixel, up to the allocation
/// limit: a few kilobytes of compressed zeros would cost gigabytes (PIL refuses such a
/// profile). Other files, and PNGs without the chunk, are returned as they are; from a chunk
/// that runs past the end on, the bytes are kept as they are, for the decoder to refuse.
pub(crate) fn png_without_iccp(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !chunks::is_png(bytes) {
        return bytes.into();
    }
    // The chunks before the image data (the profile must come before it), up to one that runs
    // past the end (the decoder refuses it, but would inflate a profile before it first).
    // Walked twice rather than listed: a file of many tiny chunks would make a list larger
    // than the file.
    let before_data = || chunks::png(bytes).take_while(|c| c.whole && c.kind != b"IDAT" && c.kind != b"IEND");
    if !before_data().any(|c| c.kind == b"iCCP") {
        return bytes.into();
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(chunks::PNG_SIGNATURE);
    let mut rest = chunks::PNG_SIGNATURE.len();
    for c in before_data() {
        if c.kind != b"iCCP" {
            out.extend_from_slice(&bytes[c.start..c.end]);
        }
        rest = c.end;
    }
    out.extend_from_slice(&bytes[rest..]);
    out.into()
}

/// A PNG whose image-data checksums are wrong, or that ends without its end chunk (cut short,
/// or with stray bytes after its last whole chunk), repaired so that the decoder reads it as
/// PIL does (PIL checks neither; the PNG decoder here refuses both). Other files, and PNGs
/// with neither fault, are returned as they are.
pub(crate) fn png_repaired(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !chunks::is_png(bytes) {
        return bytes.into();
    }
    // Checksums to write: (where, value).
    let mut fix: Vec<(usize, [u8; 4])> = Vec::new();
    let (mut at, mut ended) = (chunks::PNG_SIGNATURE.len(), false);
    for c in chunks::png(bytes).take_while(|c| c.whole) {
        at = c.end;
        if c.kind == b"IEND" {
            ended = true;
            break;
        }
        if c.kind == b"IDAT" {
            let want = chunks::png_crc(c.kind, c.data);
            if bytes[c.end - 4..c.end] != want {
                fix.push((c.end - 4, want));
            }
        }
    }
    if fix.is_empty() && ended {
        return bytes.into();
    }
    // From `at` on, no whole chunk: the file was cut short (or ends in a few stray bytes).
    let mut out = bytes[..if ended { bytes.len() } else { at }].to_vec();
    for (p, crc) in fix {
        out[p..p + 4].copy_from_slice(&crc);
    }
    if !ended {
        // Image data cut short keeps what it has, as PIL decodes what the stream holds (a
        // stream that stops before the last row is still refused, as PIL refuses it); another
        // chunk cut short is dropped, as PIL stops reading there.
        if let Some(head) = bytes.get(at..at + 8).filter(|h| &h[4..8] == b"IDAT") {
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let data = &bytes[at + 8..bytes.len().min((at + 8).saturating_add(len))];
            if !data.is_empty() {
                out.extend_from_slice(&(data.len() as u32).to_be_bytes());
                out.extend_from_slice(b"IDAT");
                out.extend_from_slice(data);
                out.extend_from_slice(&chunks::png_crc(b"IDAT", data));
            }
        }
        out.extend_from_slice(b"\0\0\0\0IEND\xaeB`\x82");
    }
    out.into()
}

/// An animated WebP's bytes with its first frame's blending turned off (other files are
/// returned as they are). A first frame is drawn on a transparent canvas, which libwebp's
/// animation decoder (what PIL reads with) does by writing the frame's pixels as they are;
/// the WebP decoder here blends them onto the canvas instead, which rounds every pixel one
/// level down. Without blending it copies them, as libwebp does.
pub(crate) fn webp_first_frame_unblended(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WEBP" {
        return bytes.into();
    }
    let Some(frame) = chunks::riff(bytes).find(|c| c.kind == b"ANMF") else {
        return bytes.into();
    };
    // The frame's flags follow its offset, size and duration (five 24-bit numbers); bit 1 set
    // means "do not blend".
    let flags = frame.start + 8 + 15;
    if frame.data.len() >= 16 && bytes[flags] & 0b10 == 0 {
        let mut out = bytes.to_vec();
        out[flags] |= 0b10;
        return out.into();
    }
    bytes.into()
}

/// Allocation budget handed to the image decoders for a pixel limit: room for the largest
/// in-memory layout (RGBA f32, 16 bytes a pixel) plus decoder working memory.
pub(crate) fn alloc_limit(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(16).saturating_add(256 << 20)
}

/// Maps an image-crate error to a sample status.
fn image_error_status(e: &ImageError) -> Status {
    match e {
        ImageError::Limits(_) => Status::TooLarge,
        _ => Status::DecodeError,
    }
}

/// Decodes `bytes` and applies the EXIF orientation, keeping the stored pixel type; returns the
/// image and the format sniffed from the content. `what` ("image", "mask") is used in messages. When `expect` is given, the oriented size must
/// be exactly `(w, h)`. Both that and `width * height <= max_pixels` are checked from the
/// header, before the pixels are decoded.
/// Errors carry status `decode_error` or `too_large` (the caller may remap them).
pub(crate) fn decode_oriented(
    bytes: &[u8],
    name: &str,
    max_pixels: u64,
    what: &str,
    expect: Option<(u32, u32)>,
) -> Result<(DynamicImage, ImageFormat), SampleError> {
    let err = |status: Status, msg: String| SampleError::new(status, format!("{name}: {msg}"));
    if bytes.is_empty() {
        return Err(err(Status::DecodeError, format!("empty file (0 bytes), not an {what}")));
    }
    let repaired = png_repaired(bytes);
    let stripped = png_without_iccp(&repaired);
    let unblended = webp_first_frame_unblended(&stripped);
    let bytes = &*unblended;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(Status::DecodeError, format!("cannot sniff the {what} format: {e}")))?;
    let format = reader
        .format()
        .ok_or_else(|| err(Status::DecodeError, format!("not a recognised {what} format (unknown file signature)")))?;
    let mut limits = Limits::default();
    limits.max_image_width = None;
    limits.max_image_height = None;
    limits.max_alloc = Some(alloc_limit(max_pixels));
    reader.limits(limits);

    // Everything that parses untrusted bytes runs under catch_unwind as a last-resort guard:
    // a decoder bug must turn into this sample's error, not take the batch down.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<DynamicImage, SampleError> {
        let mut decoder = reader
            .into_decoder()
            .map_err(|e| err(image_error_status(&e), format!("cannot read the {format:?} {what} header: {e}")))?;
        let (w, h) = decoder.dimensions();
        // A broken EXIF block only loses the orientation, as PIL's exif_transpose would. PNG,
        // WebP and TIFF keep it in more places (and types) than the decoders here read.
        let orientation = match format {
            ImageFormat::Png => orient::png(bytes),
            ImageFormat::WebP => orient::webp(bytes),
            ImageFormat::Tiff => {
                orient::tiff(bytes).unwrap_or_else(|| decoder.orientation().unwrap_or(Orientation::NoTransforms))
            }
            _ => decoder.orientation().unwrap_or(Orientation::NoTransforms),
        };
        if let Some((ew, eh)) = expect {
            let (ow, oh) = oriented_size(w, h, orientation);
            if (ow, oh) != (ew, eh) {
                return Err(err(
                    Status::DecodeError,
                    format!("{what} is {ow}x{oh} (w x h) but the image is {ew}x{eh}; they must match"),
                ));
            }
        }
        check_header(bytes, format, (w, h), max_pixels, what, name)?;
        if format == ImageFormat::Gif {
            return gif_first_frame(bytes, max_pixels)
                .map_err(|(status, m)| err(status, format!("cannot decode the Gif {what}: {m}")));
        }
        let mut img = DynamicImage::from_decoder(decoder)
            .map_err(|e| err(image_error_status(&e), format!("cannot decode the {format:?} {what}: {e}")))?;
        img.apply_orientation(orientation);
        Ok(img)
    }));
    match decoded {
        Ok(r) => r.map(|img| (img, format)),
        Err(_) => Err(err(Status::DecodeError, format!("the {format:?} decoder panicked on this {what}"))),
    }
}

/// A GIF's first frame as PIL loads it (then `convert("RGB")`): the frame at its offset on the
/// logical screen, grown to hold the frame where it reaches past the screen; the screen outside
/// the frame filled with the frame's transparent colour index, or index 0 where it has none;
/// each index looked up in the frame's own palette, else the global one (transparent pixels
/// keep their palette colour). The image crate fills the screen with black instead. A GIF with
/// no palette at all is refused (PIL reads its indices as grey levels).
fn gif_first_frame(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, (Status, String)> {
    let decoding = |e: gif::DecodingError| match e {
        gif::DecodingError::MemoryLimit | gif::DecodingError::OutOfMemory => (Status::TooLarge, e.to_string()),
        e => (Status::DecodeError, e.to_string()),
    };
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    // The frame's indices, a byte a pixel.
    opts.set_memory_limit(gif::MemoryLimit::Bytes(std::num::NonZeroU64::new(max_pixels.max(1)).expect("not zero")));
    let mut decoder = opts.read_info(Cursor::new(bytes)).map_err(decoding)?;
    let screen = (decoder.width() as u64, decoder.height() as u64);
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame =
        decoder.read_next_frame().map_err(decoding)?.ok_or((Status::DecodeError, "no image in the file".to_owned()))?;
    let (x0, y0, fw, fh) = (frame.left as u64, frame.top as u64, frame.width as u64, frame.height as u64);
    let (w, h) = (screen.0.max(x0 + fw), screen.1.max(y0 + fh));
    if w * h > max_pixels {
        return Err((
            Status::TooLarge,
            format!("its first frame reaches {w}x{h} pixels, over the limit of {max_pixels} pixels"),
        ));
    }
    let palette = frame.palette.as_deref().or(global.as_deref()).unwrap_or(&[]);
    let mut index = vec![frame.transparent.unwrap_or(0); (w * h) as usize];
    if fw > 0 {
        for (row, line) in frame.buffer.chunks_exact(fw as usize).enumerate().take(fh as usize) {
            let at = ((y0 + row as u64) * w + x0) as usize;
            index[at..at + fw as usize].copy_from_slice(line);
        }
    }
    // An index past the palette's end is black.
    let rgb = index
        .iter()
        .flat_map(|&i| palette.get(3 * i as usize..3 * i as usize + 3).map_or([0; 3], |c| [c[0], c[1], c[2]]))
        .collect();
    Ok(DynamicImage::ImageRgb8(image::RgbImage::from_raw(w as u32, h as u32, rgb).expect("w × h pixels")))
}

/// What every decode checks from the header before any pixel is decoded: `width * height`
/// within `max_pixels` (else `too_large`), not zero, and for a JPEG the end marker
/// ([`jpeg_has_end`]). `what` ("image", "mask") and `name` go into the message.
fn check_header(
    bytes: &[u8],
    format: ImageFormat,
    (w, h): (u32, u32),
    max_pixels: u64,
    what: &str,
    name: &str,
) -> Result<(), SampleError> {
    let err = |status: Status, msg: String| SampleError::new(status, format!("{name}: {msg}"));
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(err(
            Status::TooLarge,
            format!("{what} is {w}x{h} ({pixels} pixels), over the limit of {max_pixels} pixels"),
        ));
    }
    if pixels == 0 {
        return Err(err(Status::DecodeError, format!("{what} has zero size {w}x{h}")));
    }
    if format == ImageFormat::Jpeg {
        jpeg_has_end(bytes).map_err(|m| err(Status::DecodeError, m))?;
    }
    Ok(())
}

/// Checks that a JPEG is not cut short: its entropy-coded data must be followed by an
/// end-of-image marker. The JPEG decoder fills a truncated scan with grey instead of failing;
/// PIL refuses such files ("image file is truncated"), and so do we. The header segments are
/// walked by their lengths (so an embedded EXIF thumbnail's markers are skipped), then
/// `FF D9` is searched after the first start-of-scan. A header this walk cannot follow is left
/// to the decoder to judge.
fn jpeg_has_end(bytes: &[u8]) -> Result<(), String> {
    const TRUNCATED: &str = "truncated JPEG: the file ends before the end-of-image marker";
    let mut i = 2; // after SOI
    let scan_start = loop {
        if i >= bytes.len() {
            return Err(TRUNCATED.into());
        }
        if bytes[i] != 0xFF {
            return Ok(()); // not where a marker should be: let the decoder decide
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1; // fill bytes
        }
        let Some(&marker) = bytes.get(i) else {
            return Err(TRUNCATED.into());
        };
        i += 1;
        match marker {
            0xD9 => return Ok(()),          // EOI before any scan: the decoder reports what is missing
            0x01 | 0xD0..=0xD7 => continue, // markers without a length
            _ => {}
        }
        let Some(len) = bytes.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else {
            return Err(TRUNCATED.into());
        };
        if marker == 0xDA {
            break i + len;
        }
        i += len;
    };
    let data = bytes.get(scan_start..).unwrap_or(&[]);
    // Searched from the end: the marker is normally the last two bytes.
    if data.windows(2).rev().any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(TRUNCATED.into())
    }
}

/// Size of a `w × h` stored image after applying `o`.
fn oriented_size(w: u32, h: u32, o: Orientation) -> (u32, u32) {
    match o {
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH => {
            (h, w)
        }
        _ => (w, h),
    }
}

/// Resizes `pixels` (of the original image of `geo`, or of a scaled decode of it) by `plan`
/// (from [`plan_resize`] with the same `region`) and cuts the output window described by
/// `geo`: only the resized pixels that land inside the window are computed. Pixels of the
/// window outside the resized image are zero.
fn resize_crop(
    Pixels { rgb: src, size: (src_w, src_h), origin }: Pixels,
    plan: Option<resample::Plan>,
    region: [f64; 4],
    geo: &Geometry,
) -> Result<Vec<u8>, String> {
    let out_len = geo.out_w as usize * geo.out_h as usize * 3;
    let (Some((x0, y0, x1, y1)), Some(plan)) = (geo.visible_window(), plan) else {
        return Ok(vec![0; out_len]);
    };
    let (iw, ih) = (x1 - x0, y1 - y0);
    let whole = x0 == 0 && y0 == 0 && iw == geo.resized_w && ih == geo.resized_h;
    let all_held = origin == (0, 0) && src.dimensions() == (src_w, src_h);
    let full_region = region == [0.0, 0.0, src_w as f64, src_h as f64];
    let inner = if whole && all_held && full_region && geo.resized_w == src_w && geo.resized_h == src_h {
        // Nothing to resample.
        src.into_raw()
    } else {
        plan.run(&src, (origin.0 as usize, origin.1 as usize))?
    };
    if iw == geo.out_w && ih == geo.out_h {
        return Ok(inner);
    }
    // Zero padding around the visible part.
    let mut out = vec![0u8; out_len];
    let dx = (x0 as i64 - geo.crop_left) as usize;
    let dy = (y0 as i64 - geo.crop_top) as usize;
    let row = iw as usize * 3;
    for (r, src_row) in inner.chunks_exact(row).enumerate() {
        let start = ((dy + r) * geo.out_w as usize + dx) * 3;
        out[start..start + row].copy_from_slice(src_row);
    }
    Ok(out)
}
