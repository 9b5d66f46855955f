//! Object masks: an image in the original image's pixel frame → a 0/1 mask in the model-input frame.

use crate::store::Loc;

use super::{alloc_limit, decode_oriented, read_file, Geometry};
use crate::sample::{SampleError, Status};

/// Loads an object mask and maps it into the model-input frame of `geometry`.
///
/// The mask may be in any supported image format; a pixel is object when any of its colour
/// channels is non-zero (alpha is ignored; a palette image counts its palette colour). It must
/// be `orig_w × orig_h` after its own EXIF orientation (checked from the header, the message
/// names both sizes). It is resized to `resized_w × resized_h` with nearest-neighbour sampling
/// (source pixel `floor((x + 0.5) * orig_w / resized_w)`, as PIL's NEAREST) and cut with the
/// same crop as the image; padding is 0.
///
/// Returns `out_h * out_w` bytes, row-major, each 0 or 1. Every failure (missing, unreadable,
/// not an image, wrong size) has status `bad_mask` and names the mask's path.
pub fn load_mask(path: impl Into<Loc>, geometry: &Geometry) -> Result<Vec<u8>, SampleError> {
    let path = &path.into();
    // A store's failure stays one (the run stops and a rerun reads the mask).
    let bad = |e: SampleError| SampleError {
        transient: e.transient,
        ..SampleError::new(Status::BadMask, format!("mask {}", e.message))
    };
    let max_pixels = geometry.orig_w as u64 * geometry.orig_h as u64;
    let bytes = read_file(path, alloc_limit(max_pixels)).map_err(bad)?;
    let name = path.to_string();
    let expect = (geometry.orig_w, geometry.orig_h);
    let (img, _) = decode_oriented(&bytes, &name, max_pixels, "mask", Some(expect)).map_err(bad)?;
    // f32 keeps every non-zero value non-zero, whatever the stored depth.
    let rgb = img.to_rgb32f();
    let (w, h) = rgb.dimensions();
    let flat = rgb.as_raw();
    let object = |x: usize, y: usize| -> u8 {
        let i = (y * w as usize + x) * 3;
        u8::from(flat[i] != 0.0 || flat[i + 1] != 0.0 || flat[i + 2] != 0.0)
    };
    Ok(map_nearest(w, h, geometry, object))
}

/// Builds the `out_h × out_w` model-input-frame mask by nearest-neighbour sampling of an
/// `orig_w × orig_h` source through `geometry`; `value(x, y)` reads the source.
pub(crate) fn map_nearest(src_w: u32, src_h: u32, geometry: &Geometry, value: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let (ow, oh) = (geometry.out_w as usize, geometry.out_h as usize);
    let mut out = vec![0u8; ow * oh];
    let Some((x0, y0, x1, y1)) = geometry.visible_window() else {
        return out;
    };
    let nearest = |dst: u32, src_size: u32, dst_size: u32| -> usize {
        let s = ((dst as f64 + 0.5) * src_size as f64 / dst_size as f64).floor() as usize;
        s.min(src_size as usize - 1)
    };
    let src_x: Vec<usize> = (x0..x1).map(|x| nearest(x, src_w, geometry.resized_w)).collect();
    for ry in y0..y1 {
        let sy = nearest(ry, src_h, geometry.resized_h);
        let oy = (ry as i64 - geometry.crop_top) as usize;
        let ox0 = (x0 as i64 - geometry.crop_left) as usize;
        let row = &mut out[oy * ow + ox0..oy * ow + ox0 + src_x.len()];
        for (o, &sx) in row.iter_mut().zip(&src_x) {
            *o = value(sx, sy);
        }
    }
    out
}
