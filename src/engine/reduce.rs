//! Statistics and map resizing where the maps are: on the model's device, a batch at a time, so
//! that only the sums behind each sample's statistics and its `map_size²` map are copied back
//! instead of its whole `h × w` map. The definitions are the host's ([`crate::stats::map_stats`],
//! [`crate::stats::resize_map`]); [`crate::stats::finish`] turns the sums into statistics either way.

use super::no_grad;
use crate::stats::{axis_range, finish, map_sums, resize_map, MapStats, MapSums, Region};
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

/// What every map of a batch is reduced to on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Reduction {
    /// Side of the area-resized map (the output's `map_size`), at least 1.
    pub map_size: usize,
    /// Regions whose mass is summed for every sample.
    pub regions: Vec<Region>,
}

/// Fixed columns of the sums tensor, before the box masses.
const FIXED: usize = 8;

/// The device half of a reduction: `sums` is `[N, K]` float64 (the [`MapSums`] fields, one box
/// mass per box, then the mask mass when any sample has a mask) and `resized` `[N, S, S]` f32.
pub struct DeviceReduction {
    pub sums: Tensor,
    pub resized: Tensor,
    boxes: usize,
    has_mask: Vec<bool>,
    has_bbox: Vec<bool>,
    n_values: usize,
}

/// Reduces `map` (`[N, H, W]` f32, on its device) on that device. `bboxes[i]` and `masks[i]`
/// belong to sample i (missing entries count as None; a mask must have H·W values, others are
/// ignored as on the host).
pub fn reduce(
    map: &Tensor,
    r: &Reduction,
    bboxes: &[Option<[f32; 4]>],
    masks: &[Option<Vec<u8>>],
) -> Result<DeviceReduction> {
    let size = map.size();
    ensure!(
        size.len() == 3 && map.kind() == Kind::Float,
        "map must be [N, H, W] float32, is {size:?} {:?}",
        map.kind()
    );
    ensure!(r.map_size > 0, "map size must be at least 1");
    let (n, h, w) = (size[0], size[1], size[2]);
    let dev = map.device();
    let hw = (h * w) as usize;
    let dbl = (Kind::Double, dev);
    no_grad(|| {
        // The resize averages the values as they are, as `resize_map` does.
        let s = r.map_size as i64;
        let resized = map.unsqueeze(1).adaptive_avg_pool2d([s, s]).view([n, s, s]);

        // Cleaned values: negatives, NaN and infinities count as 0.
        let m = map.nan_to_num(0.0, 0.0, 0.0).clamp_min(0.0);
        let flat = m.view([n, h * w]);
        let (max, argmax) = flat.max_dim(1, false);
        let d = flat.to_kind(Kind::Double);
        let total = d.sum_dim_intlist(&[1i64][..], false, Kind::Double);
        let m_ln_m = d.xlogy(&d).sum_dim_intlist(&[1i64][..], false, Kind::Double);
        let d3 = d.view([n, h, w]);
        let wx = (Tensor::arange(w, dbl) + 0.5) / w as f64;
        let wy = (Tensor::arange(h, dbl) + 0.5) / h as f64;
        let sum_x = d3.sum_dim_intlist(&[1i64][..], false, Kind::Double).matmul(&wx);
        let sum_y = d3.sum_dim_intlist(&[2i64][..], false, Kind::Double).matmul(&wy);
        // Ascending sort: rank i (1-based) weights the i-th smallest value.
        let (sorted, _) = flat.sort(1, false);
        let sorted = sorted.to_kind(Kind::Double);
        let ranks = Tensor::arange_start(1, h * w + 1, dbl);
        let rank_weighted = sorted.matmul(&ranks);
        let k = (hw.div_ceil(20)) as i64;
        let top = sorted.narrow(1, h * w - k, k).sum_dim_intlist(&[1i64][..], false, Kind::Double);

        // One column per box: the sample's object box (0 without one), then each region.
        let boxes = 1 + r.regions.len();
        let has_bbox: Vec<bool> = (0..n as usize).map(|i| bboxes.get(i).copied().flatten().is_some()).collect();
        let box_mass = if r.regions.is_empty() && !has_bbox.contains(&true) {
            Tensor::zeros([n, 1], dbl)
        } else {
            // From an integral image (one leading row and column of zeros): the mass of rows
            // ya..yb × columns xa..xb is I[yb, xb] − I[ya, xb] − I[yb, xa] + I[ya, xa].
            let integral =
                d3.cumsum(1, Kind::Double).cumsum(2, Kind::Double).constant_pad_nd([1, 0, 1, 0]).view([n, -1]);
            let (hu, wu) = (h as usize, w as usize);
            let at = |y: usize, x: usize| (y * (wu + 1) + x) as i64;
            let mut corners: Vec<i64> = Vec::with_capacity(n as usize * boxes * 4);
            for i in 0..n as usize {
                let bbox = bboxes.get(i).copied().flatten().unwrap_or([0.0; 4]);
                for b in std::iter::once(bbox).chain(r.regions.iter().map(Region::bounds)) {
                    let (xs, ys) = (axis_range(wu, b[0], b[2]), axis_range(hu, b[1], b[3]));
                    if xs.is_empty() || ys.is_empty() {
                        // I[0, 0] four times: exactly 0, as on the host, whatever order a
                        // device adds the four terms in.
                        corners.extend([at(0, 0); 4]);
                        continue;
                    }
                    corners.extend([
                        at(ys.end, xs.end),
                        at(ys.start, xs.end),
                        at(ys.end, xs.start),
                        at(ys.start, xs.start),
                    ]);
                }
            }
            let corners = super::upload(Tensor::from_slice(&corners), dev).view([n, (boxes * 4) as i64]);
            let g = integral.gather(1, &corners, false).view([n, boxes as i64, 4]);
            g.select(2, 0) - g.select(2, 1) - g.select(2, 2) + g.select(2, 3)
        };

        let mut cols = vec![
            total.unsqueeze(1),
            max.to_kind(Kind::Double).unsqueeze(1),
            argmax.to_kind(Kind::Double).unsqueeze(1),
            m_ln_m.unsqueeze(1),
            sum_x.unsqueeze(1),
            sum_y.unsqueeze(1),
            rank_weighted.unsqueeze(1),
            top.unsqueeze(1),
            box_mass,
        ];
        let has_mask: Vec<bool> =
            (0..n as usize).map(|i| masks.get(i).and_then(|m| m.as_ref()).is_some_and(|m| m.len() == hw)).collect();
        if has_mask.iter().any(|&b| b) {
            let mut bytes = vec![0u8; n as usize * hw];
            for (i, chunk) in bytes.chunks_exact_mut(hw).enumerate() {
                if let Some(Some(mk)) = masks.get(i).filter(|_| has_mask[i]) {
                    chunk.copy_from_slice(mk);
                }
            }
            let mk = super::upload(Tensor::from_slice(&bytes), dev).view([n, h * w]).ne(0);
            cols.push((&d * mk).sum_dim_intlist(&[1i64][..], true, Kind::Double));
        }
        Ok(DeviceReduction { sums: Tensor::cat(&cols, 1), resized, boxes, has_mask, has_bbox, n_values: hw })
    })
}

impl DeviceReduction {
    /// Copies the sums back and splits them per sample.
    pub fn sums_per_sample(&self) -> Result<Vec<MapSums>> {
        let host = self.sums.to_device(Device::Cpu).contiguous();
        let k = host.size()[1] as usize;
        let v: Vec<f64> = Vec::try_from(host.view([-1]))?;
        let any_mask = self.has_mask.iter().any(|&b| b);
        ensure!(k == FIXED + self.boxes + usize::from(any_mask), "reduction has {k} columns");
        Ok(v.chunks_exact(k)
            .enumerate()
            .map(|(i, row)| MapSums {
                n: self.n_values,
                total: row[0],
                max: row[1] as f32,
                argmax: row[2] as usize,
                sum_m_ln_m: row[3],
                sum_x: row[4],
                sum_y: row[5],
                rank_weighted: row[6],
                top_sum: row[7],
                bbox_mass: self.has_bbox[i].then_some(row[FIXED]),
                region_mass: row[FIXED + 1..FIXED + self.boxes].to_vec(),
                mask_mass: self.has_mask[i].then(|| row[FIXED + self.boxes]),
            })
            .collect())
    }
}

/// Checks `device`'s reduction against the host's definitions before it is trusted with a run's
/// statistics: maps of the model's input size `h × w` that hold what real maps can (a smooth
/// bump, sparse hot pixels, NaN, infinities and negatives, an all-zero map), with object boxes,
/// masks and `r`'s regions, are reduced on the device and on the host; the statistics must
/// agree within [`CHECK_TOLERANCE`] and the resized maps within it relative to their values.
/// The error names the first disagreement (a [`Disagreement`]), or why the reduction could not
/// run.
pub fn self_check(device: Device, r: &Reduction, h: usize, w: usize) -> Result<()> {
    let n = 4;
    let v = check_maps(n, h, w);
    let t = Tensor::from_slice(&v).view([n as i64, h as i64, w as i64]).to_device(device);
    let boxes = [Some([0.1, 0.2, 0.8, 0.9]), None, Some([0.5, 0.0, 1.0, 0.5]), Some([0.0, 0.0, 1.0, 1.0])];
    let masks: Vec<Option<Vec<u8>>> = (0..n)
        .map(|i| (i % 2 == 0).then(|| (0..h * w).map(|p| u8::from((p / w) % 3 == i % 3) * 255).collect()))
        .collect();
    let dr = reduce(&t, r, &boxes, &masks)?;
    let sums = dr.sums_per_sample()?;
    let s2 = r.map_size * r.map_size;
    let resized: Vec<f32> = Vec::try_from(dr.resized.to_device(Device::Cpu).contiguous().view([-1]))?;
    ensure!(
        sums.len() == n && resized.len() == n * s2,
        "reduction returned {} sums, {} resized values",
        sums.len(),
        resized.len()
    );
    for i in 0..n {
        let map = &v[i * h * w..(i + 1) * h * w];
        let host = map_sums(map, h, w, boxes[i], masks[i].as_deref(), &r.regions);
        let (a, b) = (finish(&host, h, w, &[], 0, 0), finish(&sums[i], h, w, &[], 0, 0));
        compare_stats(&a, &b, CHECK_TOLERANCE).map_err(|e| Disagreement(format!("test map {i} of {h}×{w}: {e}")))?;
        let want = resize_map(map, h, w, r.map_size);
        for (p, (a, b)) in want.iter().zip(&resized[i * s2..(i + 1) * s2]).enumerate() {
            let both_finite = a.is_finite() && b.is_finite();
            if (both_finite && (a - b).abs() > CHECK_TOLERANCE * a.abs().max(1.0)) || (a.is_finite() != b.is_finite()) {
                let why = format!("test map {i} of {h}×{w}: resized pixel {p} is {b} on the device, {a} on the host");
                return Err(Disagreement(why).into());
            }
        }
    }
    Ok(())
}

/// A device's reduction that ran and gave other numbers than the host's ([`self_check`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Disagreement(pub String);

/// How far the device's statistics may be from the host's in [`self_check`]: both sum in
/// float64, so they differ by rounding alone (about 1e-7; the host takes logarithms in f32).
pub const CHECK_TOLERANCE: f32 = 1e-5;

/// Whether two samples' statistics agree: the same ones defined, values within `tol`
/// (`attr_total` and `attr_max` relative to their size). The error names the first that does not.
pub fn compare_stats(host: &MapStats, dev: &MapStats, tol: f32) -> Result<()> {
    let rel = |name: &str, a: f32, b: f32| -> Result<()> {
        if (a - b).abs() > tol * a.abs().max(b.abs()).max(1.0) || a.is_nan() != b.is_nan() {
            bail!("{name} is {b} on the device, {a} on the host");
        }
        Ok(())
    };
    rel("attr_total", host.attr_total, dev.attr_total)?;
    rel("attr_max", host.attr_max, dev.attr_max)?;
    let shares = [
        ("attr_entropy", host.attr_entropy, dev.attr_entropy),
        ("attr_gini", host.attr_gini, dev.attr_gini),
        ("attr_top5_share", host.attr_top5_share, dev.attr_top5_share),
        ("attr_com_x", host.attr_com_x, dev.attr_com_x),
        ("attr_com_y", host.attr_com_y, dev.attr_com_y),
        ("attr_peak_x", host.attr_peak_x, dev.attr_peak_x),
        ("attr_peak_y", host.attr_peak_y, dev.attr_peak_y),
        ("bbox_mass_share", host.bbox_mass_share, dev.bbox_mass_share),
        ("mask_mass_share", host.mask_mass_share, dev.mask_mass_share),
    ];
    let regions = host.region_shares.iter().zip(&dev.region_shares).map(|(a, b)| ("a region share", *a, *b));
    ensure!(
        host.region_shares.len() == dev.region_shares.len(),
        "{} region shares on the device, {} on the host",
        dev.region_shares.len(),
        host.region_shares.len()
    );
    for (name, a, b) in shares.into_iter().chain(regions) {
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) if (a - b).abs() <= tol => {}
            _ => bail!("{name} is {b:?} on the device, {a:?} on the host"),
        }
    }
    Ok(())
}

/// Deterministic maps for checks and tests: sample i is, by i mod 4, a smooth bump times noise,
/// sparse hot pixels, noise with NaN, −1 and +∞ mixed in, or all zeros.
pub(crate) fn check_maps(n: usize, h: usize, w: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut v = Vec::with_capacity(n * h * w);
    for i in 0..n {
        for p in 0..h * w {
            let (x, y) = ((p % w) as f32 / w as f32, (p / w) as f32 / h as f32);
            let bump = (-((x - 0.7).powi(2) + (y - 0.3).powi(2)) * 20.0).exp();
            v.push(match i % 4 {
                0 => bump * rnd(),
                1 if rnd() < 0.02 => 10.0 * rnd(),
                1 => 0.0,
                2 => [f32::NAN, -1.0, f32::INFINITY, 0.5][p % 4] * rnd(),
                _ => 0.0,
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, what: &str) {
        assert!((a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0), "{what}: host {a} vs device {b}");
    }

    /// The device reduction (libtorch on the CPU here, the same kernels' definitions as on CUDA)
    /// gives the host's sums, statistics and resized maps.
    #[test]
    fn device_sums_equal_the_hosts() {
        for (n, h, w, size) in [(8usize, 29usize, 37usize, 16usize), (4, 32, 32, 64), (3, 7, 5, 3), (1, 1, 1, 1)] {
            let v = check_maps(n, h, w);
            let t = Tensor::from_slice(&v).view([n as i64, h as i64, w as i64]);
            let regions = vec![
                Region { name: "corner".into(), x0: 0.6, y0: 0.0, x1: 1.0, y1: 0.4 },
                Region { name: "sliver".into(), x0: 0.5, y0: 0.5, x1: 0.5001, y1: 0.9 },
                Region { name: "all".into(), x0: 0.0, y0: 0.0, x1: 1.0, y1: 1.0 },
            ];
            let boxes: Vec<Option<[f32; 4]>> =
                (0..n).map(|i| (i % 2 == 0).then_some([0.1, 0.2 + 0.05 * i as f32, 0.8, 0.9])).collect();
            // Masks on some samples, one of the wrong length (ignored, as on the host); the list
            // is one short, so the last sample has none.
            let masks: Vec<Option<Vec<u8>>> = (0..n.saturating_sub(1))
                .map(|i| match i % 3 {
                    0 => Some((0..h * w).map(|p| u8::from(p % 3 == 0) * 7).collect()),
                    1 => Some(vec![1; h * w + 1]),
                    _ => None,
                })
                .collect();
            let red = Reduction { map_size: size, regions: regions.clone() };
            let dr = reduce(&t, &red, &boxes, &masks).unwrap();
            let sums = dr.sums_per_sample().unwrap();
            let resized: Vec<f32> = Vec::try_from(dr.resized.contiguous().view([-1])).unwrap();
            assert_eq!(sums.len(), n);
            for i in 0..n {
                let map = &v[i * h * w..(i + 1) * h * w];
                let mask = masks.get(i).and_then(|m| m.as_deref());
                let host = map_sums(map, h, w, boxes[i], mask, &regions);
                let dev = &sums[i];
                let what = |f: &str| format!("{n}x{h}x{w} sample {i} {f}");
                close(host.total, dev.total, &what("total"));
                assert_eq!(host.max, dev.max, "{}", what("max"));
                assert_eq!(host.argmax, dev.argmax, "{}", what("argmax"));
                if host.total > 0.0 {
                    // Σ m ln m: the host takes ln in f32 (relative error ~1e-7).
                    assert!((host.sum_m_ln_m - dev.sum_m_ln_m).abs() <= 1e-6 * host.total, "{}", what("m ln m"));
                    close(host.sum_x, dev.sum_x, &what("sum_x"));
                    close(host.sum_y, dev.sum_y, &what("sum_y"));
                    close(host.rank_weighted, dev.rank_weighted, &what("rank_weighted"));
                    close(host.top_sum, dev.top_sum, &what("top_sum"));
                    assert_eq!(host.bbox_mass.is_some(), dev.bbox_mass.is_some(), "{}", what("bbox"));
                    if let (Some(a), Some(b)) = (host.bbox_mass, dev.bbox_mass) {
                        close(a, b, &what("bbox mass"));
                    }
                    assert_eq!(host.mask_mass.is_some(), dev.mask_mass.is_some(), "{}", what("mask"));
                    if let (Some(a), Some(b)) = (host.mask_mass, dev.mask_mass) {
                        close(a, b, &what("mask mass"));
                    }
                    for (k, (a, b)) in host.region_mass.iter().zip(&dev.region_mass).enumerate() {
                        close(*a, *b, &what(&format!("region {k}")));
                    }
                }
                let (sh, sd) = (finish(&host, h, w, &[], 0, 0), finish(dev, h, w, &[], 0, 0));
                let pairs = [
                    (sh.attr_entropy, sd.attr_entropy),
                    (sh.attr_gini, sd.attr_gini),
                    (sh.attr_top5_share, sd.attr_top5_share),
                    (sh.attr_com_x, sd.attr_com_x),
                    (sh.attr_peak_y, sd.attr_peak_y),
                    (sh.bbox_mass_share, sd.bbox_mass_share),
                    (sh.mask_mass_share, sd.mask_mass_share),
                ];
                for (k, (a, b)) in pairs.into_iter().enumerate() {
                    assert_eq!(a.is_some(), b.is_some(), "{}", what(&format!("statistic {k} defined")));
                    if let (Some(a), Some(b)) = (a, b) {
                        assert!((a - b).abs() <= 1e-6, "{}: {a} vs {b}", what(&format!("statistic {k}")));
                    }
                }
                assert_eq!(sh.region_shares.len(), regions.len());
                assert_eq!(sh.region_shares.len(), sd.region_shares.len());
                // Bad values are averaged as they are on both sides; compare the finite ones.
                let want = resize_map(map, h, w, size);
                for (p, (a, b)) in want.iter().zip(&resized[i * size * size..(i + 1) * size * size]).enumerate() {
                    if a.is_finite() || b.is_finite() {
                        assert!(
                            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                            "{}: {a} vs {b}",
                            what(&format!("pixel {p}"))
                        );
                    }
                }
            }
        }
    }

    /// Without boxes or regions no integral image is built; the other sums are unchanged.
    #[test]
    fn no_boxes_or_regions() {
        let (n, h, w) = (3usize, 12usize, 10usize);
        let v = check_maps(n, h, w);
        let t = Tensor::from_slice(&v).view([n as i64, h as i64, w as i64]);
        let red = Reduction { map_size: 5, regions: Vec::new() };
        let sums = reduce(&t, &red, &[], &[]).unwrap().sums_per_sample().unwrap();
        for (i, dev) in sums.iter().enumerate() {
            let host = map_sums(&v[i * h * w..(i + 1) * h * w], h, w, None, None, &[]);
            close(host.total, dev.total, "total");
            close(host.rank_weighted, dev.rank_weighted, "rank_weighted");
            assert!(dev.region_mass.is_empty() && dev.bbox_mass.is_none() && dev.mask_mass.is_none());
        }
    }

    /// The self-check passes where the reduction is right (libtorch's CPU kernels here), at a
    /// model-input size and at odd sizes.
    #[test]
    fn self_check_passes_here() {
        let regions = vec![
            Region { name: "corner".into(), x0: 0.0, y0: 0.0, x1: 0.25, y1: 0.25 },
            Region { name: "border".into(), x0: 0.0, y0: 0.9, x1: 1.0, y1: 1.0 },
        ];
        self_check(Device::Cpu, &Reduction { map_size: 64, regions: regions.clone() }, 224, 224).unwrap();
        self_check(Device::Cpu, &Reduction { map_size: 16, regions }, 29, 37).unwrap();
        self_check(Device::Cpu, &Reduction { map_size: 1, regions: Vec::new() }, 1, 1).unwrap();
    }

    /// What the self-check catches: a statistic off by more than the tolerance, one defined on
    /// one side only, a different number of regions, and a reduction that fails.
    #[test]
    fn self_check_reports_disagreements() {
        let v = check_maps(1, 20, 20);
        let sums = map_sums(&v, 20, 20, Some([0.0, 0.0, 0.5, 0.5]), None, &[]);
        let host = finish(&sums, 20, 20, &[], 0, 0);
        compare_stats(&host, &host.clone(), CHECK_TOLERANCE).unwrap();

        let off = MapStats { attr_gini: host.attr_gini.map(|g| g + 1e-3), ..host.clone() };
        let e = compare_stats(&host, &off, CHECK_TOLERANCE).unwrap_err().to_string();
        assert!(e.contains("attr_gini"), "{e}");
        let undefined = MapStats { bbox_mass_share: None, ..host.clone() };
        let e = compare_stats(&host, &undefined, CHECK_TOLERANCE).unwrap_err().to_string();
        assert!(e.contains("bbox_mass_share"), "{e}");
        let total = MapStats { attr_total: host.attr_total * 1.001, ..host.clone() };
        assert!(compare_stats(&host, &total, CHECK_TOLERANCE).unwrap_err().to_string().contains("attr_total"));
        let regions = MapStats { region_shares: vec![Some(0.5)], ..host.clone() };
        assert!(compare_stats(&host, &regions, CHECK_TOLERANCE).unwrap_err().to_string().contains("region"));

        // A reduction that cannot run is not a disagreement.
        let e = self_check(Device::Cpu, &Reduction { map_size: 0, regions: Vec::new() }, 8, 8).unwrap_err();
        assert!(e.to_string().contains("map size") && !e.is::<Disagreement>(), "{e}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let red = Reduction { map_size: 4, regions: Vec::new() };
        let flat = Tensor::zeros([2, 16], (Kind::Float, Device::Cpu));
        assert!(reduce(&flat, &red, &[], &[]).is_err());
        let ints = Tensor::zeros([2, 4, 4], (Kind::Int, Device::Cpu));
        assert!(reduce(&ints, &red, &[], &[]).is_err());
        let zero = Reduction { map_size: 0, regions: Vec::new() };
        assert!(reduce(&Tensor::zeros([2, 4, 4], (Kind::Float, Device::Cpu)), &zero, &[], &[]).is_err());
    }
}
