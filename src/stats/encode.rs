//! Compact encodings of the maps stored per row: the CAM as float16, the attribution map as an
//! 8-bit grayscale PNG scaled to its maximum.

use anyhow::{bail, Context};
use image::codecs::png::{CompressionType, FilterType, PngDecoder, PngEncoder};
use image::{ColorType, ExtendedColorType, ImageDecoder, ImageEncoder};

use super::{clean, EncodedMap};

/// Encodes values as IEEE float16, little-endian, 2 bytes each (rounded to nearest; finite
/// values beyond the f16 range saturate at ±65504, so a finite CAM, which is what an `ok` row
/// holds, stays finite).
pub fn encode_cam_f16(cam: &[f32]) -> Vec<u8> {
    let max = half::f16::MAX.to_f32();
    let mut out = Vec::with_capacity(cam.len() * 2);
    for &v in cam {
        out.extend_from_slice(&half::f16::from_f32(v.clamp(-max, max)).to_le_bytes());
    }
    out
}

/// Decodes little-endian float16 bytes (as written by [`encode_cam_f16`]) to f32.
/// A trailing odd byte is ignored.
pub fn decode_cam_f16(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

/// Window `[start, end)` of input indices averaged into output index `i`, as PyTorch's
/// adaptive average pooling computes it: `floor(i·in/out) .. ceil((i+1)·in/out)`.
fn window(i: usize, input: usize, output: usize) -> (usize, usize) {
    let start = i * input / output;
    let end = ((i + 1) * input).div_ceil(output);
    (start, end)
}

/// Resizes an `h × w` row-major map to `size × size` by area averaging, exactly as PyTorch's
/// `F.interpolate(mode="area")` / `adaptive_avg_pool2d`: output pixel (i, j) is the plain mean
/// of input rows `floor(i·h/size) .. ceil((i+1)·h/size)` × the same for columns (windows may
/// overlap when the ratio is not an integer). Upsampling by an integer factor repeats pixels;
/// by another factor, some output pixels average two neighbouring input pixels.
///
/// Values are averaged as given (no clamping). Returns `size * size` zeros when the map is
/// empty or its length is not `h * w`.
pub fn resize_map(map: &[f32], h: usize, w: usize, size: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; size * size];
    if h == 0 || w == 0 || size == 0 || h.checked_mul(w) != Some(map.len()) {
        return out;
    }
    // Columns first: each input row → `size` column means.
    let cols: Vec<(usize, usize)> = (0..size).map(|j| window(j, w, size)).collect();
    let mut tmp = vec![0.0f64; h * size];
    for (row, trow) in map.chunks_exact(w).zip(tmp.chunks_exact_mut(size)) {
        for (t, &(a, b)) in trow.iter_mut().zip(&cols) {
            *t = row[a..b].iter().map(|&v| v as f64).sum::<f64>() / (b - a) as f64;
        }
    }
    // Then rows: mean of the column means over each row window.
    for (i, orow) in out.chunks_exact_mut(size).enumerate() {
        let (a, b) = window(i, h, size);
        for (j, o) in orow.iter_mut().enumerate() {
            let s: f64 = (a..b).map(|r| tmp[r * size + j]).sum();
            *o = (s / (b - a) as f64) as f32;
        }
    }
    out
}

/// Encodes an `h × w` map as a `size × size` 8-bit grayscale PNG.
///
/// The map is resized with [`resize_map`]; `scale` is the largest resized value (negatives,
/// NaN and infinities count as 0) and pixel `q = round(v / scale · 255)`, so `q / 255 · scale`
/// recovers `v` within `scale / 510`. A map whose scale is 0 gives an all-zero PNG with scale 0.
/// `size` 0 is treated as 1. Should PNG encoding fail (it cannot for an in-memory buffer of
/// this size), `png` is left empty.
pub fn encode_map_png(map: &[f32], h: usize, w: usize, size: u32) -> EncodedMap {
    let size = size.max(1);
    encode_resized_map_png(&resize_map(map, h, w, size as usize), size)
}

/// The second half of [`encode_map_png`]: encodes a map already resized to `size × size` (by
/// [`resize_map`], or by the engine on its device). A `resized` of the wrong length gives an
/// empty `png`.
pub fn encode_resized_map_png(resized: &[f32], size: u32) -> EncodedMap {
    let scale = resized.iter().fold(0.0f32, |m, &v| m.max(clean(v)));
    let q: Vec<u8> = if scale > 0.0 {
        let k = 255.0 / scale as f64;
        resized.iter().map(|&v| (clean(v) as f64 * k).round().clamp(0.0, 255.0) as u8).collect()
    } else {
        vec![0; resized.len()]
    };
    let mut png = Vec::with_capacity(256 + q.len() / 2);
    let enc = PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::Adaptive);
    if q.len() as u64 != size as u64 * size as u64 || enc.write_image(&q, size, size, ExtendedColorType::L8).is_err() {
        png.clear();
    }
    EncodedMap { png, scale, size }
}

/// Largest map PNG [`decode_map_png`] accepts, in pixels (maps are small; this guards memory).
const MAX_MAP_PIXELS: u64 = 1 << 26;

/// Decodes a map PNG written by [`encode_map_png`]: returns `(values, h, w)`, values row-major
/// with `q / 255 · scale` per pixel. Errors when the bytes are not a PNG or the PNG is not
/// 8-bit grayscale.
pub fn decode_map_png(png: &[u8], scale: f32) -> anyhow::Result<(Vec<f32>, u32, u32)> {
    let dec = PngDecoder::new(std::io::Cursor::new(png)).context("map is not a readable PNG")?;
    if dec.color_type() != ColorType::L8 {
        bail!("map PNG is {:?}, expected 8-bit grayscale (L8)", dec.color_type());
    }
    let (w, h) = dec.dimensions();
    if w as u64 * h as u64 > MAX_MAP_PIXELS {
        bail!("map PNG is {w}x{h}, over the limit of {MAX_MAP_PIXELS} pixels");
    }
    let mut q = vec![0u8; dec.total_bytes() as usize];
    dec.read_image(&mut q).context("map PNG is corrupt")?;
    Ok((q.iter().map(|&v| v as f32 / 255.0 * scale).collect(), h, w))
}
