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

/// Every case of `scripts/make_decode_cases.py` (JPEGs of every kind, PNG, GIF, BMP, TIFF,
/// WebP and PPM files in their usual modes) decodes to PIL's pixels bit for bit, and the model
/// inputs made from them (Resize by the shorter side or to an exact size, up or down, then
/// CenterCrop, padded where the crop is larger) equal torchvision's on PIL's image bit for bit;
/// except the script's known differences, within their tolerance.
#[test]
fn images_decode_as_pil_and_preprocess_as_torchvision() {
    let dir = cases();
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let transforms = index["transforms"].as_object().unwrap();
    let cases = index["cases"].as_array().unwrap();
    assert!(cases.len() >= 12 && transforms.len() >= 3, "{index}");
    // Every case is checked; the failures are listed together.
    let mut failed = Vec::new();
    for case in cases {
        let (name, file) = (case["name"].as_str().unwrap(), case["file"].as_str().unwrap());
        let (w, h) = (case["w"].as_u64().unwrap() as u32, case["h"].as_u64().unwrap() as u32);
        // 0 (equal) but for the script's KNOWN_DIFFERENCES.
        let tolerance = case["tolerance"].as_u64().unwrap() as u8;
        let bytes = std::fs::read(dir.join(file)).unwrap();
        // Decode only: an exact resize to the image's own (oriented) size keeps the pixels.
        let pre =
            Preprocess { resize: Resize::Exact { h, w }, crop: None, max_pixels: 1 << 28, jpeg_dct_scaling: false };
        let decoded = match decode_bytes(&bytes, file, &pre) {
            Ok(d) => d,
            Err(e) => {
                failed.push(format!("{file}: {e}"));
                continue;
            }
        };
        let pil = std::fs::read(dir.join(format!("{name}.rgb"))).unwrap();
        let (max, mean, _) = diffs(&decoded.rgb, &pil);
        if max > tolerance {
            failed.push(format!("{file}: pixels differ from PIL's (largest {max}, mean |diff| {mean:.4})"));
        }
        for (t, spec) in transforms {
            let pre = preprocess((&spec[0], &spec[1]));
            let input = decode_bytes(&bytes, file, &pre).unwrap().rgb;
            let torchvision = std::fs::read(dir.join(format!("{name}.{t}.rgb"))).unwrap();
            let (max, mean, signed) = diffs(&input, &torchvision);
            if max > tolerance {
                failed.push(format!(
                    "{file}, {t} {spec}: differs from torchvision's: largest {max}, mean {mean:.4}, signed {signed:+.4}"
                ));
            }
        }
    }
    assert!(failed.is_empty(), "{} of {} cases differ:\n{}", failed.len(), cases.len(), failed.join("\n"));
}

/// A YCCK JPEG (as Photoshop writes CMYK; libjpeg turns it into CMYK) and a plain CMYK one,
/// both written by libjpeg with Adobe's marker, decode to PIL's pixels bit for bit.
#[test]
fn ycck_and_cmyk_jpegs_decode_as_pil() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (150usize, 110usize);
    for (name, space) in [("ycck", mozjpeg::ColorSpace::JCS_YCCK), ("cmyk", mozjpeg::ColorSpace::JCS_CMYK)] {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
        c.set_color_space(space);
        c.set_size(w, h);
        c.set_quality(85.0);
        let mut started = c.start_compress(Vec::new()).unwrap();
        let cmyk: Vec<u8> = (0..w * h)
            .flat_map(|i| [(i % w * 255 / w) as u8, (i / w * 255 / h) as u8, (i * 7 % 251) as u8, (i % 31 * 8) as u8])
            .collect();
        started.write_scanlines(&cmyk).unwrap();
        let file = started.finish().unwrap();
        let path = dir.path().join(format!("{name}.jpg"));
        std::fs::write(&path, &file).unwrap();
        let out = std::process::Command::new(crate::common::python())
            .args(["-c", "import sys; from PIL import Image; im = Image.open(sys.argv[1]); assert im.mode == 'CMYK', im.mode; sys.stdout.buffer.write(im.convert('RGB').tobytes())"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let pre = Preprocess {
            resize: Resize::Exact { h: h as u32, w: w as u32 },
            crop: None,
            max_pixels: 1 << 28,
            jpeg_dct_scaling: false,
        };
        let ours = decode_bytes(&file, name, &pre).unwrap().rgb;
        let (max, mean, _) = diffs(&ours, &out.stdout);
        assert_eq!(max, 0, "{name}: pixels differ from PIL's (mean |diff| {mean:.4})");
    }
}

/// Files PIL refuses (the script checks that it does) are `decode_error`s here too, for the
/// decode alone and for every model-input transform (a centre crop leaves out the rows where a
/// JPEG's damage is: they are still read through, as PIL reads them).
#[test]
fn files_pil_refuses_are_decode_errors() {
    let dir = cases();
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let refused = index["refused"].as_array().unwrap();
    assert!(!refused.is_empty(), "{index}");
    let transforms = index["transforms"].as_object().unwrap();
    for case in refused {
        let file = case["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let own =
            Preprocess { resize: Resize::ShorterSide(300), crop: None, max_pixels: 1 << 28, jpeg_dct_scaling: false };
        for pre in std::iter::once(own).chain(transforms.values().map(|spec| preprocess((&spec[0], &spec[1])))) {
            match decode_bytes(&bytes, file, &pre) {
                Ok(_) => panic!("{file} ({pre:?}): decoded, but PIL refuses it: {}", case["pil_error"]),
                Err(e) => {
                    assert_eq!(e.status, saliency_audit::sample::Status::DecodeError, "{file}: {e}");
                    assert!(
                        e.message.starts_with(file) && e.message.contains("JPEG data that libjpeg stops at"),
                        "{}",
                        e.message
                    );
                }
            }
        }
    }
}
