//! The decode stage against PIL and torchvision on the same files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use saliency_audit::decode::{decode_bytes, Preprocess, Resize};
use serde_json::Value;

use crate::common::generate_once;

fn cases() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    generate_once(&CELL, "scripts/make_decode_cases.py", "decode-cases")
}

/// (largest, mean, signed mean) difference of `a` from `b`, in grey levels.
fn diffs(a: &[u8], b: &[u8]) -> (u8, f64, f64) {
    assert_eq!(a.len(), b.len(), "size mismatch");
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    let signed: i64 = a.iter().zip(b).map(|(x, y)| *x as i64 - *y as i64).sum();
    (max, sum as f64 / a.len() as f64, signed as f64 / a.len() as f64)
}

/// A torchvision transform of cases.json as the decode stage's preprocessing.
fn preprocess((size, crop): (&Value, &Value)) -> Preprocess {
    let resize = match size {
        Value::Array(hw) => Resize::Exact { h: hw[0].as_u64().unwrap() as u32, w: hw[1].as_u64().unwrap() as u32 },
        v => Resize::ShorterSide(v.as_u64().unwrap() as u32),
    };
    let crop = crop.as_u64().map(|c| (c as u32, c as u32));
    Preprocess { resize, crop, max_pixels: 1 << 28, jpeg_dct_scaling: false }
}

/// JPEGs (4:2:0, 4:2:2, 4:4:4, odd sizes, grey, progressive, optimised Huffman tables, EXIF
/// orientations) decode to PIL's pixels bit for bit; the model inputs made from them and from
/// a PNG (Resize by the shorter side or to an exact size, up or down, then CenterCrop, padded
/// where the crop is larger) equal torchvision's on PIL's image bit for bit.
#[test]
fn images_decode_as_pil_and_preprocess_as_torchvision() {
    let dir = cases();
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let transforms = index["transforms"].as_object().unwrap();
    let cases = index["cases"].as_array().unwrap();
    assert!(cases.len() >= 12 && transforms.len() >= 3, "{index}");
    for case in cases {
        let (name, file) = (case["name"].as_str().unwrap(), case["file"].as_str().unwrap());
        let (w, h) = (case["w"].as_u64().unwrap() as u32, case["h"].as_u64().unwrap() as u32);
        let bytes = std::fs::read(dir.join(file)).unwrap();
        // Decode only: an exact resize to the image's own (oriented) size keeps the pixels.
        let pre =
            Preprocess { resize: Resize::Exact { h, w }, crop: None, max_pixels: 1 << 28, jpeg_dct_scaling: false };
        let decoded = decode_bytes(&bytes, file, &pre).unwrap_or_else(|e| panic!("{file}: {e}"));
        let pil = std::fs::read(dir.join(format!("{name}.rgb"))).unwrap();
        let (max, mean, _) = diffs(&decoded.rgb, &pil);
        assert_eq!(max, 0, "{file}: pixels differ from PIL's (mean |diff| {mean:.4})");

        for (t, spec) in transforms {
            let pre = preprocess((&spec[0], &spec[1]));
            let input = decode_bytes(&bytes, file, &pre).unwrap().rgb;
            let torchvision = std::fs::read(dir.join(format!("{name}.{t}.rgb"))).unwrap();
            let (max, mean, signed) = diffs(&input, &torchvision);
            assert_eq!(max, 0, "{file}, {t} {spec}: differs from torchvision's: mean {mean:.4}, signed {signed:+.4}");
        }
    }
}
