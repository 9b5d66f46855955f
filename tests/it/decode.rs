//! The decode stage against PIL and torchvision on the same JPEG files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use saliency_audit::decode::{decode_bytes, Preprocess, Resize};

use crate::common::generate_once;

fn cases() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    generate_once(&CELL, "scripts/make_decode_cases.py", "decode-cases")
}

fn diffs(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len(), "size mismatch");
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    (max, sum as f64 / a.len() as f64)
}

/// JPEGs (4:2:0, 4:2:2, 4:4:4, odd sizes, grey, progressive, optimised Huffman tables, EXIF
/// orientations) decode to PIL's pixels bit for bit, and the model input (Resize, CenterCrop)
/// stays within one grey level of torchvision's on PIL's image, without a bias.
#[test]
fn jpegs_decode_as_pil_and_preprocess_as_torchvision() {
    let dir = cases();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let (resize, crop) = (index["resize"].as_u64().unwrap() as u32, index["crop"].as_u64().unwrap() as u32);
    let cases = index["cases"].as_array().unwrap();
    assert!(cases.len() >= 9, "{cases:?}");
    let mut worst_input = (0u8, 0f64);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (w, h) = (case["w"].as_u64().unwrap() as u32, case["h"].as_u64().unwrap() as u32);
        let bytes = std::fs::read(dir.join(format!("{name}.jpg"))).unwrap();
        // Decode only: an exact resize to the image's own (oriented) size keeps the pixels.
        let pre =
            Preprocess { resize: Resize::Exact { h, w }, crop: None, max_pixels: 1 << 28, jpeg_dct_scaling: false };
        let decoded = decode_bytes(&bytes, name, &pre).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pil = std::fs::read(dir.join(format!("{name}.rgb"))).unwrap();
        let (max, mean) = diffs(&decoded.rgb, &pil);
        assert_eq!(max, 0, "{name}: pixels differ from PIL's (mean |diff| {mean:.4})");

        let pre = Preprocess {
            resize: Resize::ShorterSide(resize),
            crop: Some((crop, crop)),
            max_pixels: 1 << 28,
            jpeg_dct_scaling: false,
        };
        let input = decode_bytes(&bytes, name, &pre).unwrap().rgb;
        let torchvision = std::fs::read(dir.join(format!("{name}.input.rgb"))).unwrap();
        let (max, mean) = diffs(&input, &torchvision);
        let signed: f64 =
            input.iter().zip(&torchvision).map(|(a, b)| *a as f64 - *b as f64).sum::<f64>() / input.len() as f64;
        println!("{name}: model input vs torchvision: max |diff| {max}, mean {mean:.4}, signed {signed:+.4}");
        // The resize rounds differently from PIL's on about one value in six, without a bias.
        assert!(
            max <= 1 && mean < 0.25 && signed.abs() < 0.02,
            "{name}: model input differs from torchvision's: max {max}, mean {mean:.4}, signed {signed:+.4}"
        );
        worst_input = (worst_input.0.max(max), worst_input.1.max(mean));
    }
    println!("worst model-input difference: max {}, mean {:.4}", worst_input.0, worst_input.1);
}
