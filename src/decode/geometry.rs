//! Where the model-input frame lies in the original image: resize and centre-crop arithmetic.

use super::{Preprocess, Resize};

/// Maps original-image pixel coordinates (after EXIF orientation) into the model-input frame.
///
/// The model input is built in two steps, as torchvision's eval transform does:
/// the `orig_w × orig_h` image is resized to `resized_w × resized_h`, then an
/// `out_w × out_h` window whose top-left corner sits at (`crop_left`, `crop_top`) in the
/// resized image is cut out. Offsets are negative when the crop is larger than the resized
/// image; the part of the window outside the image is zero padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Width of the decoded image after EXIF orientation, in pixels.
    pub orig_w: u32,
    /// Height of the decoded image after EXIF orientation, in pixels.
    pub orig_h: u32,
    /// Width after the resize step.
    pub resized_w: u32,
    /// Height after the resize step.
    pub resized_h: u32,
    /// Column of the resized image that becomes the output's column 0 (negative: zero padding).
    pub crop_left: i64,
    /// Row of the resized image that becomes the output's row 0 (negative: zero padding).
    pub crop_top: i64,
    /// Width of the model input.
    pub out_w: u32,
    /// Height of the model input.
    pub out_h: u32,
}

impl Geometry {
    /// Computes the geometry for an `orig_w × orig_h` image under `pre`.
    ///
    /// Resize follows torchvision: `ShorterSide(s)` sets the shorter side to `s` and the longer
    /// one to `int(s * long / short)` (truncated); `Exact { h, w }` resizes to exactly that.
    /// The centre crop's offsets are `round((H - h) / 2)` and `round((W - w) / 2)` with Python's
    /// round-half-to-even; a crop larger than the image is padded as torchvision's `CenterCrop`
    /// pads (`(crop - size) // 2` zero columns/rows before the image).
    ///
    /// Errors (as text) when any size involved is zero.
    pub fn plan(orig_w: u32, orig_h: u32, pre: &Preprocess) -> Result<Geometry, String> {
        if orig_w == 0 || orig_h == 0 {
            return Err(format!("image has zero size {orig_w}x{orig_h}"));
        }
        let (resized_w, resized_h) = match pre.resize {
            Resize::ShorterSide(size) => {
                if size == 0 {
                    return Err("preprocessing resize size is 0".into());
                }
                let (short, long) = if orig_w <= orig_h { (orig_w, orig_h) } else { (orig_h, orig_w) };
                // Same float arithmetic as Python's int(size * long / short).
                let new_long_f = (size as f64 * long as f64 / short as f64).trunc();
                if new_long_f > u32::MAX as f64 {
                    return Err(format!(
                        "resizing {orig_w}x{orig_h} so the shorter side is {size} gives a longer side over u32"
                    ));
                }
                let new_long = (new_long_f as u32).max(1);
                if orig_w <= orig_h {
                    (size, new_long)
                } else {
                    (new_long, size)
                }
            }
            Resize::Exact { h, w } => {
                if h == 0 || w == 0 {
                    return Err(format!("preprocessing resize size {h}x{w} (h x w) has a zero side"));
                }
                (w, h)
            }
        };
        let (out_h, out_w, crop_top, crop_left) = match pre.crop {
            None => (resized_h, resized_w, 0, 0),
            Some((ch, cw)) => {
                if ch == 0 || cw == 0 {
                    return Err(format!("preprocessing crop size {ch}x{cw} (h x w) has a zero side"));
                }
                (ch, cw, center_offset(resized_h, ch), center_offset(resized_w, cw))
            }
        };
        Ok(Geometry { orig_w, orig_h, resized_w, resized_h, crop_left, crop_top, out_w, out_h })
    }

    /// Box `[x0, y0, x1, y1]` in original pixels → normalised 0..1 box in the model-input
    /// frame, clipped to the frame; `None` if the box is empty after clipping (or not finite).
    ///
    /// A point `x` maps to `(x * resized_w / orig_w - crop_left) / out_w` (likewise `y`).
    pub fn map_box(&self, b: [f32; 4]) -> Option<[f32; 4]> {
        if b.iter().any(|v| !v.is_finite()) || self.orig_w == 0 || self.orig_h == 0 {
            return None;
        }
        let sx = self.resized_w as f64 / self.orig_w as f64;
        let sy = self.resized_h as f64 / self.orig_h as f64;
        let fx = |x: f32| ((x as f64 * sx - self.crop_left as f64) / self.out_w as f64).clamp(0.0, 1.0);
        let fy = |y: f32| ((y as f64 * sy - self.crop_top as f64) / self.out_h as f64).clamp(0.0, 1.0);
        let (x0, x1) = (fx(b[0].min(b[2])), fx(b[0].max(b[2])));
        let (y0, y1) = (fy(b[1].min(b[3])), fy(b[1].max(b[3])));
        if x1 <= x0 || y1 <= y0 {
            return None;
        }
        Some([x0 as f32, y0 as f32, x1 as f32, y1 as f32])
    }

    /// The part of the output window that lies inside the resized image, in resized-image
    /// coordinates: `(x0, y0, x1, y1)`, half-open. `None` when they do not overlap.
    pub(crate) fn visible_window(&self) -> Option<(u32, u32, u32, u32)> {
        let x0 = self.crop_left.max(0);
        let y0 = self.crop_top.max(0);
        let x1 = (self.crop_left + self.out_w as i64).min(self.resized_w as i64);
        let y1 = (self.crop_top + self.out_h as i64).min(self.resized_h as i64);
        (x0 < x1 && y0 < y1).then_some((x0 as u32, y0 as u32, x1 as u32, y1 as u32))
    }
}

/// Offset of a centred crop of `crop` out of `size`, as torchvision computes it: after padding
/// a too-small image by `(crop - size) // 2` before it, then `round((size - crop) / 2)` with
/// round-half-to-even.
pub(crate) fn center_offset(size: u32, crop: u32) -> i64 {
    if crop > size {
        -(((crop - size) / 2) as i64)
    } else {
        let d = (size - crop) as i64;
        let k = d / 2;
        if d % 2 == 0 || k % 2 == 0 {
            k
        } else {
            k + 1
        }
    }
}
