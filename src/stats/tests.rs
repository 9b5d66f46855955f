use super::*;

fn close(a: Option<f32>, b: f64, what: &str) {
    let a = a.unwrap_or_else(|| panic!("{what} is None"));
    assert!((a as f64 - b).abs() < 1e-5, "{what}: {a} vs {b}");
}

fn stats(map: &[f32], h: usize, w: usize) -> MapStats {
    map_stats(map, h, w, &[], 0, 0, None, None, &[])
}

fn region(name: &str, b: [f32; 4]) -> Region {
    Region { name: name.into(), x0: b[0], y0: b[1], x1: b[2], y1: b[3] }
}

/// Small deterministic pseudo-random generator for test data.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32) / (1u64 << 24) as f32
        })
        .collect()
}

#[test]
fn uniform_map() {
    let (h, w) = (7, 9);
    let n = h * w;
    let s = stats(&vec![2.0; n], h, w);
    assert!((s.attr_total - 126.0).abs() < 1e-4);
    assert_eq!(s.attr_max, 2.0);
    close(s.attr_entropy, 1.0, "entropy");
    close(s.attr_gini, 0.0, "gini");
    close(s.attr_com_x, 0.5, "com_x");
    close(s.attr_com_y, 0.5, "com_y");
    close(s.attr_top5_share, 4.0 / 63.0, "top5"); // ceil(0.05 · 63) = 4
    close(s.attr_peak_x, 0.5 / 9.0, "peak_x"); // first maximum: pixel (0, 0)
    close(s.attr_peak_y, 0.5 / 7.0, "peak_y");
}

#[test]
fn single_hot_pixel() {
    let (h, w) = (7, 9);
    let n = h * w;
    let mut m = vec![0.0f32; n];
    m[2 * w + 3] = 5.0; // (x = 3, y = 2)
    let s = stats(&m, h, w);
    close(s.attr_entropy, 0.0, "entropy");
    close(s.attr_gini, (n as f64 - 1.0) / n as f64, "gini");
    close(s.attr_top5_share, 1.0, "top5");
    close(s.attr_peak_x, 3.5 / 9.0, "peak_x");
    close(s.attr_peak_y, 2.5 / 7.0, "peak_y");
    close(s.attr_com_x, 3.5 / 9.0, "com_x");
    close(s.attr_com_y, 2.5 / 7.0, "com_y");
    assert_eq!(s.attr_max, 5.0);
}

#[test]
fn hand_computed_2x2() {
    // [[1, 2], [3, 4]]: total 10.
    let s = map_stats(&[1.0, 2.0, 3.0, 4.0], 2, 2, &[0.0, 0.0, 0.0, 5.0], 2, 2, None, None, &[]);
    // Gini: ((-3)·1 + (-1)·2 + 1·3 + 3·4) / (4 · 10) = 10 / 40.
    close(s.attr_gini, 0.25, "gini");
    // k = ceil(4 / 20) = 1 → 4 / 10.
    close(s.attr_top5_share, 0.4, "top5");
    let p = [0.1f64, 0.2, 0.3, 0.4];
    let ent = -p.iter().map(|p| p * p.ln()).sum::<f64>() / 4f64.ln();
    close(s.attr_entropy, ent, "entropy");
    // Column sums 4, 6 at 0.25, 0.75; row sums 3, 7.
    close(s.attr_com_x, 0.55, "com_x");
    close(s.attr_com_y, 0.6, "com_y");
    close(s.attr_peak_x, 0.75, "peak_x");
    close(s.attr_peak_y, 0.75, "peak_y");
    assert_eq!(s.cam_max, 5.0);
    close(s.cam_com_x, 0.75, "cam_com_x");
    close(s.cam_com_y, 0.75, "cam_com_y");
}

#[test]
fn box_region_and_mask_shares() {
    // 8×8, mass only in the top-right quarter (x ≥ 4, y < 4), constant there.
    let (h, w) = (8, 8);
    let mut m = vec![0.0f32; h * w];
    for y in 0..4 {
        for x in 4..8 {
            m[y * w + x] = 1.5;
        }
    }
    let regions = [
        region("top_right", [0.5, 0.0, 1.0, 0.5]),
        region("left", [0.0, 0.0, 0.5, 1.0]),
        region("tr_left_half", [0.5, 0.0, 0.75, 0.5]),
        region("empty", [0.3, 0.3, 0.3, 0.9]),
    ];
    let mut mask = vec![0u8; h * w];
    mask[..w].fill(255); // the top row: 4 of the 16 hot pixels
    let s = map_stats(&m, h, w, &[], 0, 0, Some([0.0, 0.5, 1.0, 1.0]), Some(&mask), &regions);
    assert_eq!(s.region_shares.len(), 4);
    close(s.region_shares[0], 1.0, "top_right");
    close(s.region_shares[1], 0.0, "left");
    close(s.region_shares[2], 0.5, "tr_left_half"); // columns 4, 5 of 4..8
    close(s.region_shares[3], 0.0, "empty");
    close(s.bbox_mass_share, 0.0, "bbox elsewhere");
    close(s.mask_mass_share, 0.25, "mask");

    // Edges: a pixel is inside when x0 ≤ centre < x1. Column 4's centre is 4.5/8 = 0.5625.
    let s = map_stats(&m, h, w, &[], 0, 0, Some([0.5625, 0.0, 1.0, 1.0]), None, &[]);
    close(s.bbox_mass_share, 1.0, "left edge inclusive");
    let s = map_stats(&m, h, w, &[], 0, 0, Some([0.0, 0.0, 0.5625, 1.0]), None, &[]);
    close(s.bbox_mass_share, 0.0, "right edge exclusive");
    assert_eq!(s.mask_mass_share, None, "no mask given");
}

#[test]
fn zero_map_leaves_ratios_undefined() {
    let regions = [region("r", [0.0, 0.0, 1.0, 1.0])];
    let mask = vec![1u8; 16];
    let s = map_stats(&[0.0; 16], 4, 4, &[0.0; 4], 2, 2, Some([0.0, 0.0, 1.0, 1.0]), Some(&mask), &regions);
    assert_eq!(s.attr_total, 0.0);
    assert_eq!(s.attr_max, 0.0);
    assert_eq!(s.cam_max, 0.0);
    let none = [
        s.attr_entropy,
        s.attr_gini,
        s.attr_top5_share,
        s.attr_com_x,
        s.attr_com_y,
        s.attr_peak_x,
        s.attr_peak_y,
        s.cam_com_x,
        s.cam_com_y,
        s.bbox_mass_share,
        s.mask_mass_share,
    ];
    assert!(none.iter().all(Option::is_none), "{s:?}");
    assert_eq!(s.region_shares, vec![None]);
}

#[test]
fn bad_values_and_shapes_do_not_panic() {
    // Negatives and NaN count as 0.
    let s = stats(&[-1.0, f32::NAN, 0.0, 2.0], 2, 2);
    assert_eq!(s.attr_total, 2.0);
    close(s.attr_entropy, 0.0, "entropy");
    close(s.attr_peak_x, 0.75, "peak_x");
    // Wrong lengths: totals only, no panic.
    let s = map_stats(&[1.0; 5], 2, 2, &[1.0; 3], 2, 2, Some([0.0, 0.0, 1.0, 1.0]), Some(&[1]), &[]);
    assert_eq!(s.attr_total, 5.0);
    assert_eq!(s.attr_com_x, None);
    assert_eq!(s.cam_com_x, None);
    assert_eq!(s.cam_max, 1.0);
    // Mask of the wrong length: no mask share.
    let s = map_stats(&[1.0; 4], 2, 2, &[], 0, 0, None, Some(&[1, 1]), &[]);
    assert_eq!(s.mask_mass_share, None);
    assert!(s.attr_gini.is_some());
    // Empty and absurd shapes.
    let s = map_stats(&[], 0, 0, &[], 0, 0, None, None, &[]);
    assert_eq!(s, MapStats::default());
    let s = map_stats(&[1.0], usize::MAX, 2, &[], usize::MAX, 3, None, None, &[]);
    assert_eq!(s.attr_total, 1.0);
}

#[test]
fn radix_sort_matches_std_sort() {
    let mut m = noise(10_000, 7);
    m.iter_mut().step_by(3).for_each(|v| *v *= 1e-30); // spread the exponents
    m[5] = 0.0;
    m[6] = 1e30;
    let got: Vec<f32> = with_sorted_positive(&m, |s| s.iter().map(|&v| f32::from_bits(v)).collect());
    let mut want: Vec<f32> = m.iter().copied().filter(|&v| v > 0.0).collect();
    want.sort_by(f32::total_cmp);
    assert_eq!(got, want);
}

#[test]
fn gini_and_top5_match_a_direct_computation() {
    let (h, w) = (31, 17);
    let dense = noise(h * w, 3);
    // Sparse: 97% zeros (and some negatives, which count as zeros), so that the top 5% reach
    // into the zeros.
    let sparse: Vec<f32> = noise(h * w, 5)
        .iter()
        .enumerate()
        .map(|(i, &v)| match i % 33 {
            0 => v,
            1 => -v,
            _ => 0.0,
        })
        .collect();
    for m in [dense, sparse] {
        let s = stats(&m, h, w);
        let mut v: Vec<f64> = m.iter().map(|&x| x.max(0.0) as f64).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let total: f64 = v.iter().sum();
        let gini = v.iter().enumerate().map(|(i, x)| (2.0 * (i as f64 + 1.0) - n - 1.0) * x).sum::<f64>() / (n * total);
        close(s.attr_gini, gini, "gini");
        let k = v.len().div_ceil(20);
        close(s.attr_top5_share, v[v.len() - k..].iter().sum::<f64>() / total, "top5");
        let ent = -v.iter().map(|x| x / total).map(|p| if p > 0.0 { p * p.ln() } else { 0.0 }).sum::<f64>() / n.ln();
        close(s.attr_entropy, ent, "entropy");
    }
}

#[test]
fn resize_map_area_average() {
    let m: Vec<f32> = (1..=16).map(|v| v as f32).collect();
    assert_eq!(resize_map(&m, 4, 4, 2), vec![3.5, 5.5, 11.5, 13.5]);
    // Non-integer ratio: windows overlap as in adaptive_avg_pool2d (3 → 2: [0,2), [1,3)).
    let r = resize_map(&[1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 1.0, 2.0, 4.0], 3, 3, 2);
    assert_eq!(r, vec![1.5, 3.0, 1.5, 3.0]);
    // Upsampling repeats.
    assert_eq!(
        resize_map(&[1.0, 2.0, 3.0, 4.0], 2, 2, 4),
        vec![1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0]
    );
    assert_eq!(resize_map(&[1.0; 3], 2, 2, 2), vec![0.0; 4], "bad shape → zeros");
}

#[test]
fn map_png_round_trip() {
    let (h, w) = (224, 224);
    let m: Vec<f32> = noise(h * w, 11).iter().map(|v| v * 3.0).collect();
    let enc = encode_map_png(&m, h, w, 64);
    assert_eq!(enc.size, 64);
    assert_eq!(&enc.png[1..4], b"PNG");
    let resized = resize_map(&m, h, w, 64);
    let max = resized.iter().cloned().fold(0.0f32, f32::max);
    assert_eq!(enc.scale, max);
    let (back, bh, bw) = decode_map_png(&enc.png, enc.scale).unwrap();
    assert_eq!((bh, bw), (64, 64));
    let worst = back.iter().zip(&resized).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= enc.scale / 510.0 * 1.0001, "worst {worst}, scale {}", enc.scale);
    assert!(back.iter().cloned().fold(0.0f32, f32::max) == enc.scale, "maximum maps to 255");

    // All-zero map: scale 0, zero pixels.
    let z = encode_map_png(&[0.0; 16], 4, 4, 8);
    assert_eq!(z.scale, 0.0);
    let (back, bh, bw) = decode_map_png(&z.png, z.scale).unwrap();
    assert_eq!((bh, bw, back.len()), (8, 8, 64));
    assert!(back.iter().all(|&v| v == 0.0));

    assert!(decode_map_png(b"not a png", 1.0).is_err());
    let mut rgb = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::new(2, 2)).write_to(&mut rgb, image::ImageFormat::Png).unwrap();
    assert!(decode_map_png(rgb.get_ref(), 1.0).is_err(), "RGB PNG is refused");
}

#[test]
fn cam_f16_round_trip() {
    let cam = [0.0f32, 1.0, 0.5, 2.71, 1000.0, 1e-3, 65504.0];
    let bytes = encode_cam_f16(&cam);
    assert_eq!(bytes.len(), cam.len() * 2);
    assert_eq!(&bytes[2..4], &[0x00, 0x3c], "1.0 is 0x3c00, little-endian");
    let back = decode_cam_f16(&bytes);
    for (a, b) in cam.iter().zip(&back) {
        assert!((a - b).abs() <= a.abs() / 2048.0, "{a} vs {b}");
    }
    assert_eq!(decode_cam_f16(&bytes[..3]).len(), 1, "odd trailing byte ignored");
    // Finite values past float16's range saturate: a finite CAM stays finite.
    let back = decode_cam_f16(&encode_cam_f16(&[1e6, -7e4, 65519.0, 65520.0]));
    assert_eq!(back, [65504.0, -65504.0, 65504.0, 65504.0]);
}

#[test]
fn shares_stay_in_0_1_without_negative_zero() {
    // An all-black mask, and rounding of differences of sums, on either side of the range.
    assert!(super::share(-0.0, 3.0).is_sign_positive());
    assert_eq!(super::share(-0.0, 3.0), 0.0);
    assert_eq!(super::share(-1e-17, 1.0), 0.0);
    assert_eq!(super::share(1.0 + 1e-12, 1.0), 1.0);
    assert_eq!(super::share(0.25, 1.0), 0.25);
}
