//! Stats stage: summary statistics of one sample's attribution maps, and the compact encodings
//! (float16 CAM, 8-bit PNG map) stored in the output rows. Plain Rust on f32 slices.
//!
//! Conventions shared by every function here:
//! * maps are row-major `H × W`; pixel `(x, y)` is at index `y * W + x`;
//! * values are attributions, expected to be ≥ 0; negatives, NaN and infinities are treated as 0;
//! * a pixel's centre in the normalised frame is `((x + 0.5) / W, (y + 0.5) / H)`; it is inside
//!   the box `[x0, y0, x1, y1]` when `x0 ≤ cx < x1` and `y0 ≤ cy < y1`;
//! * sums are accumulated in f64.

mod encode;

#[cfg(test)]
mod tests;

pub use encode::{decode_cam_f16, decode_map_png, encode_cam_f16, encode_map_png, encode_resized_map_png, resize_map};

/// A named rectangle in the model-input frame, coordinates normalised to 0..1.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// Name of the region (a column suffix in the output).
    pub name: String,
    /// Left edge (inclusive).
    pub x0: f32,
    /// Top edge (inclusive).
    pub y0: f32,
    /// Right edge (exclusive).
    pub x1: f32,
    /// Bottom edge (exclusive).
    pub y1: f32,
}

impl Region {
    /// `[x0, y0, x1, y1]`.
    pub fn bounds(&self) -> [f32; 4] {
        [self.x0, self.y0, self.x1, self.y1]
    }
}

/// Statistics of one sample's maps. `map` = guided Grad-CAM reduced over channels by absolute
/// value (Σ_c |a_c|), H×W row-major; `cam` = Grad-CAM at layer resolution h×w.
/// Shares/entropy/etc. are None where the map's total is 0 (undefined).
///
/// See [`map_stats`] for the definition of every field.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MapStats {
    /// Σ m over the map.
    pub attr_total: f32,
    /// Largest map value (0 for an empty map).
    pub attr_max: f32,
    /// Normalised Shannon entropy of p = m / total: −Σ p ln p / ln(H·W), in 0..1.
    pub attr_entropy: Option<f32>,
    /// Gini coefficient of the map values, in 0..(n−1)/n.
    pub attr_gini: Option<f32>,
    /// Share of the total held by the largest ⌈0.05·n⌉ values.
    pub attr_top5_share: Option<f32>,
    /// Centre of mass, x, normalised 0..1.
    pub attr_com_x: Option<f32>,
    /// Centre of mass, y, normalised 0..1.
    pub attr_com_y: Option<f32>,
    /// Centre of the first maximal pixel (row-major), x, normalised.
    pub attr_peak_x: Option<f32>,
    /// Centre of the first maximal pixel (row-major), y, normalised.
    pub attr_peak_y: Option<f32>,
    /// Largest CAM value (0 for an empty CAM).
    pub cam_max: f32,
    /// CAM centre of mass, x, normalised; None when the CAM's total is 0.
    pub cam_com_x: Option<f32>,
    /// CAM centre of mass, y, normalised; None when the CAM's total is 0.
    pub cam_com_y: Option<f32>,
    /// Share of the map's mass inside the object box; None also when no bbox given.
    pub bbox_mass_share: Option<f32>,
    /// Share of the map's mass on non-zero mask pixels; None also when no mask given.
    pub mask_mass_share: Option<f32>,
    /// Share of the map's mass inside each region, same order as the regions given.
    pub region_shares: Vec<Option<f32>>,
}

/// The map as an 8-bit grayscale PNG scaled to its maximum: pixel q dequantises to q/255*scale.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedMap {
    /// PNG bytes, `size × size`, 8-bit grayscale.
    pub png: Vec<u8>,
    /// Value of pixel 255 (the resized map's maximum); 0 for an all-zero map.
    pub scale: f32,
    /// Side of the square PNG, in pixels.
    pub size: u32,
}

/// An attribution value as used by the statistics: negatives, NaN and infinities count as 0.
#[inline]
pub(crate) fn clean(v: f32) -> f32 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// Computes the statistics of one sample's maps.
///
/// * `map`: `h × w` attribution map; `cam`: `ch × cw` Grad-CAM.
/// * `bbox`: object box, normalised to the `map` frame (see [`crate::decode::Geometry::map_box`]).
/// * `mask`: `h × w` object mask (non-zero = object).
/// * `regions`: named normalised rectangles.
///
/// With m the (cleaned) map values, n = h·w and T = Σ m:
/// * `attr_total` = T, `attr_max` = max m;
/// * `attr_entropy` = −Σ p ln p / ln n with p = m / T (0 ln 0 = 0; 0 when n = 1);
/// * `attr_gini` = Σ_i (2i − n − 1)·m_(i) / (n·T), m_(i) sorted ascending, i = 1..n;
/// * `attr_top5_share` = (sum of the k largest values) / T, k = ⌈n / 20⌉ (exact integer ceil
///   of 0.05·n);
/// * `attr_com_x` = Σ m·(x + 0.5)/w / T, `attr_com_y` likewise with (y + 0.5)/h;
/// * `attr_peak_x/y` = centre ((x + 0.5)/w, (y + 0.5)/h) of the first maximum in row-major order;
/// * `cam_max`, `cam_com_x/y` as above on the CAM (com None when the CAM's total is 0);
/// * `bbox_mass_share` and each of `region_shares` = (mass of pixels whose centre is inside the
///   box, `x0 ≤ cx < x1`, `y0 ≤ cy < y1`) / T;
/// * `mask_mass_share` = Σ m·[mask ≠ 0] / T.
///
/// Every ratio over T is None when T = 0. Bad shapes never panic: when `map.len() != h·w` only
/// `attr_total`/`attr_max` are filled; when `cam.len() != ch·cw` the CAM centre is None; when
/// the mask's length is not h·w its share is None.
///
/// This is [`map_sums`] followed by [`finish`]; the engine can compute the same sums where the
/// map is (on the device) and hand them to [`finish`].
#[allow(clippy::too_many_arguments)]
pub fn map_stats(
    map: &[f32],
    h: usize,
    w: usize,
    cam: &[f32],
    ch: usize,
    cw: usize,
    bbox: Option<[f32; 4]>,
    mask: Option<&[u8]>,
    regions: &[Region],
) -> MapStats {
    finish(&map_sums(map, h, w, bbox, mask, regions), h, w, cam, ch, cw)
}

/// The sums behind a map's statistics (see [`map_stats`] for the notation; m cleaned, n = h·w).
/// [`map_sums`] computes them on the host; the engine computes the same on its device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MapSums {
    /// Number of map values (h·w when the shape is right).
    pub n: usize,
    /// T = Σ m.
    pub total: f64,
    /// max m (0 for an empty map).
    pub max: f32,
    /// Row-major index of the first maximum.
    pub argmax: usize,
    /// Σ m ln m (0 ln 0 = 0).
    pub sum_m_ln_m: f64,
    /// Σ m·(x + 0.5)/w.
    pub sum_x: f64,
    /// Σ m·(y + 0.5)/h.
    pub sum_y: f64,
    /// Σ_i i·m_(i), values sorted ascending, i = 1..n.
    pub rank_weighted: f64,
    /// Sum of the ⌈n / 20⌉ largest values.
    pub top_sum: f64,
    /// Mass inside the object box, when one is given.
    pub bbox_mass: Option<f64>,
    /// Mass inside each region, in order.
    pub region_mass: Vec<f64>,
    /// Mass on the mask's non-zero pixels, when a mask of n values is given.
    pub mask_mass: Option<f64>,
}

/// The sums of [`MapSums`] for one map, on the host. The sort-based sums (`rank_weighted`,
/// `top_sum`) and the box and mask masses are only computed when the shape is right and T > 0
/// (they are 0 / None otherwise; [`finish`] leaves every ratio undefined then).
pub fn map_sums(
    map: &[f32],
    h: usize,
    w: usize,
    bbox: Option<[f32; 4]>,
    mask: Option<&[u8]>,
    regions: &[Region],
) -> MapSums {
    let n = map.len();
    let mm = moments(map, h, w);
    let mut s = MapSums {
        n,
        total: mm.total,
        max: mm.max,
        argmax: mm.argmax,
        sum_m_ln_m: mm.sum_m_ln_m,
        sum_x: mm.sum_x,
        sum_y: mm.sum_y,
        ..MapSums::default()
    };
    if h.checked_mul(w) != Some(n) || n == 0 || mm.total <= 0.0 || !mm.total.is_finite() {
        s.region_mass = vec![0.0; regions.len()];
        return s;
    }
    // Gini's weighted sum and the top-5% sum from one ascending sort of the positive values;
    // the zeros (n − len of them) take ranks 1..=zeros and add nothing to either sum.
    (s.rank_weighted, s.top_sum) = with_sorted_positive(map, |sorted| {
        let zeros = (n - sorted.len()) as f64;
        let weighted: f64 =
            sorted.iter().enumerate().map(|(i, &v)| (zeros + i as f64 + 1.0) * f32::from_bits(v) as f64).sum();
        let k = n.div_ceil(20).min(sorted.len());
        let top: f64 = sorted[sorted.len() - k..].iter().map(|&v| f32::from_bits(v) as f64).sum();
        (weighted, top)
    });
    s.bbox_mass = bbox.map(|b| box_mass(map, h, w, b));
    s.region_mass = regions.iter().map(|r| box_mass(map, h, w, r.bounds())).collect();
    s.mask_mass = mask
        .filter(|m| m.len() == n)
        .map(|mask| map.iter().zip(mask).filter(|(_, &k)| k != 0).map(|(&v, _)| clean(v) as f64).sum());
    s
}

/// The statistics from a map's sums (`h × w` map) and its CAM (`ch × cw`); see [`map_stats`].
/// `region_shares` has one entry per region mass in `sums`.
pub fn finish(sums: &MapSums, h: usize, w: usize, cam: &[f32], ch: usize, cw: usize) -> MapStats {
    let mut s = MapStats { region_shares: vec![None; sums.region_mass.len()], ..MapStats::default() };

    // CAM: max and centre of mass.
    let cam_moments = moments(cam, ch, cw);
    s.cam_max = cam_moments.max;
    if ch.checked_mul(cw) == Some(cam.len()) && cam_moments.total > 0.0 {
        s.cam_com_x = Some((cam_moments.sum_x / cam_moments.total) as f32);
        s.cam_com_y = Some((cam_moments.sum_y / cam_moments.total) as f32);
    }

    let n = sums.n;
    s.attr_total = sums.total as f32;
    s.attr_max = sums.max;
    if h.checked_mul(w) != Some(n) || n == 0 || sums.total <= 0.0 || !sums.total.is_finite() {
        return s;
    }
    let total = sums.total;

    // Entropy: −Σ p ln p = ln T − (Σ m ln m) / T.
    let h_nat = (total.ln() - sums.sum_m_ln_m / total).max(0.0);
    s.attr_entropy = Some(if n > 1 { (h_nat / (n as f64).ln()).clamp(0.0, 1.0) as f32 } else { 0.0 });
    s.attr_com_x = Some((sums.sum_x / total) as f32);
    s.attr_com_y = Some((sums.sum_y / total) as f32);
    s.attr_peak_x = Some(((sums.argmax % w) as f64 + 0.5) as f32 / w as f32);
    s.attr_peak_y = Some(((sums.argmax / w) as f64 + 0.5) as f32 / h as f32);
    // Σ (2i − n − 1)·x_(i) = 2·Σ i·x_(i) − (n + 1)·T, i = 1..n.
    let nf = n as f64;
    let gini = (2.0 * sums.rank_weighted - (nf + 1.0) * total) / (nf * total);
    s.attr_gini = Some(gini.max(0.0) as f32);
    s.attr_top5_share = Some((sums.top_sum / total) as f32);
    s.bbox_mass_share = sums.bbox_mass.map(|m| share(m, total));
    for (sh, m) in s.region_shares.iter_mut().zip(&sums.region_mass) {
        *sh = Some(share(*m, total));
    }
    s.mask_mass_share = sums.mask_mass.map(|m| share(m, total));
    s
}

/// `part / total` as a share in 0..1: a mass from differences of sums (an integral image on the
/// device) can come out a rounding error below 0 or above the total, or as −0.
fn share(part: f64, total: f64) -> f32 {
    (part / total).clamp(0.0, 1.0) as f32 + 0.0
}

/// One pass over a map: total, max, first argmax, Σ m ln m and the centre-of-mass numerators.
struct Moments {
    total: f64,
    max: f32,
    argmax: usize,
    sum_m_ln_m: f64,
    /// Σ m·(x + 0.5)/w (0 when the shape does not match).
    sum_x: f64,
    /// Σ m·(y + 0.5)/h (0 when the shape does not match).
    sum_y: f64,
}

fn moments(map: &[f32], h: usize, w: usize) -> Moments {
    let mut m = Moments { total: 0.0, max: 0.0, argmax: 0, sum_m_ln_m: 0.0, sum_x: 0.0, sum_y: 0.0 };
    let shaped = w > 0 && h.checked_mul(w) == Some(map.len());
    let mut col_sums = if shaped { vec![0.0f64; w] } else { Vec::new() };
    let row_len = if shaped { w } else { map.len().max(1) };
    for (y, row) in map.chunks(row_len).enumerate() {
        let mut row_sum = 0.0f64;
        for (x, &raw) in row.iter().enumerate() {
            let v = clean(raw);
            if v > m.max {
                m.max = v;
                m.argmax = y * row_len + x;
            }
            if v > 0.0 {
                let vd = v as f64;
                row_sum += vd;
                // ln in f32 (twice as fast; relative error ~1e-7), products summed in f64.
                m.sum_m_ln_m += vd * v.ln() as f64;
                if shaped {
                    col_sums[x] += vd;
                }
            }
        }
        m.total += row_sum;
        if shaped {
            m.sum_y += row_sum * (y as f64 + 0.5) / h as f64;
        }
    }
    for (x, c) in col_sums.iter().enumerate() {
        m.sum_x += c * (x as f64 + 0.5) / w as f64;
    }
    m
}

thread_local! {
    /// Scratch buffers for the radix sort, kept per thread between calls.
    static SORT_SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<u32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Calls `f` with the bit patterns of the cleaned values that are > 0, sorted ascending.
/// Positive finite f32 values order like their bit patterns as u32, so an LSD radix sort
/// (3 passes of 11 bits, histograms gathered in one read) does the work in O(n).
fn with_sorted_positive<R>(map: &[f32], f: impl FnOnce(&[u32]) -> R) -> R {
    SORT_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let (a, b) = &mut *bufs;
            radix_sort(map, a, b);
            f(a)
        }
        // Only reachable if `f` itself sorts again: fall back to fresh buffers.
        Err(_) => {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            radix_sort(map, &mut a, &mut b);
            f(&a)
        }
    })
}

/// Fills `a` with the sorted bit patterns of the cleaned values that are > 0; `b` is scratch.
fn radix_sort(map: &[f32], a: &mut Vec<u32>, b: &mut Vec<u32>) {
    const BITS: u32 = 11;
    const MASK: u32 = (1 << BITS) - 1;
    a.clear();
    a.extend(map.iter().map(|&v| clean(v)).filter(|&v| v > 0.0).map(f32::to_bits));
    let mut hist = [[0usize; 1 << BITS]; 3];
    for &v in a.iter() {
        hist[0][(v & MASK) as usize] += 1;
        hist[1][((v >> BITS) & MASK) as usize] += 1;
        hist[2][(v >> (2 * BITS)) as usize] += 1;
    }
    b.clear();
    b.resize(a.len(), 0);
    for (pass, counts) in hist.iter_mut().enumerate() {
        let shift = pass as u32 * BITS;
        if counts.contains(&a.len()) {
            continue; // every key has the same digit: this pass would not move anything
        }
        let mut pos = 0;
        for c in counts.iter_mut() {
            let next = pos + *c;
            *c = pos;
            pos = next;
        }
        for &v in a.iter() {
            let d = ((v >> shift) & MASK) as usize;
            b[counts[d]] = v;
            counts[d] += 1;
        }
        std::mem::swap(a, b);
    }
}

/// Half-open index range of the pixels along an axis of `size` pixels whose centres
/// `(i + 0.5) / size` satisfy `lo ≤ c < hi`.
pub fn axis_range(size: usize, lo: f32, hi: f32) -> std::ops::Range<usize> {
    let inside = |i: usize| {
        let c = (i as f64 + 0.5) / size as f64;
        lo as f64 <= c && c < hi as f64
    };
    // Centres increase with i, so the inside set is one contiguous run.
    let start = (0..size).find(|&i| inside(i)).unwrap_or(size);
    let end = (start..size).find(|&i| !inside(i)).unwrap_or(size);
    start..end
}

/// Mass of the (cleaned) map over pixels whose centres lie inside the normalised box.
fn box_mass(map: &[f32], h: usize, w: usize, b: [f32; 4]) -> f64 {
    let xs = axis_range(w, b[0], b[2]);
    let ys = axis_range(h, b[1], b[3]);
    if xs.is_empty() {
        return 0.0;
    }
    let mut sum = 0.0f64;
    for y in ys {
        let row = &map[y * w..(y + 1) * w];
        sum += row[xs.clone()].iter().map(|&v| clean(v) as f64).sum::<f64>();
    }
    sum
}
