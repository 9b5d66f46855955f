//! The dataset pipeline end to end: generated images with planted bad files, a fake engine for
//! exact shares, and the real engine for maps that must agree with `attribute`.

use crate::common::{bin, engine_cases};
use arrow::array::{Array, BinaryArray, Float32Array, Int64Array, StringArray, UInt32Array, UInt64Array};
use arrow::record_batch::RecordBatch;
use image::{ImageFormat, Rgb, RgbImage};
use saliency_audit::decode::{self, Preprocess, Resize};
use saliency_audit::engine::batch::{Attributor, MapOut, SampleMaps, U8Batch};
use saliency_audit::engine::{EngineOptions, GuidedGradCam};
use saliency_audit::pipeline::{self, PipelineConfig, Progress, RunSummary, TargetMode};
use saliency_audit::sample::{Sample, Status};
use saliency_audit::sink::{read_rows, SinkConfig};
use saliency_audit::stats::{self, Region};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A smooth random pattern, `w × h`.
fn pattern(w: u32, h: u32, seed: u32) -> RgbImage {
    let f = |x: u32, y: u32, c: u32| {
        let v = ((x as f32 / (3.0 + (seed % 5) as f32 + c as f32)).sin() * 70.0
            + (y as f32 / (4.0 + (seed % 7) as f32)).cos() * 50.0
            + 128.0
            + ((x * 31 + y * 17 + seed * 13 + c * 7) % 23) as f32) as i32;
        v.clamp(0, 255) as u8
    };
    RgbImage::from_fn(w, h, |x, y| Rgb([f(x, y, 0), f(x, y, 1), f(x, y, 2)]))
}

pub(crate) struct Dataset {
    pub dir: PathBuf,
    /// id → expected status.
    pub expected: BTreeMap<String, Status>,
}

const FORMATS: [(&str, ImageFormat); 6] = [
    ("jpg", ImageFormat::Jpeg),
    ("png", ImageFormat::Png),
    ("bmp", ImageFormat::Bmp),
    ("webp", ImageFormat::WebP),
    ("gif", ImageFormat::Gif),
    ("tiff", ImageFormat::Tiff),
];

/// `n_good` images over 3 classes in several formats and sizes, plus one planted bad file of
/// each kind, and a CSV manifest naming them all.
pub(crate) fn make_dataset(root: &Path, n_good: usize) -> Dataset {
    let classes = ["circle", "square", "triangle"];
    let mut expected = BTreeMap::new();
    let mut lines = vec!["path,label,id,bbox_x0,bbox_y0,bbox_x1,bbox_y1,mask".to_owned()];
    std::fs::create_dir_all(root.join("img")).unwrap();
    std::fs::create_dir_all(root.join("bad")).unwrap();
    for i in 0..n_good {
        let (ext, fmt) = FORMATS[i % FORMATS.len()];
        let (w, h) = (40 + (i as u32 * 7) % 31, 36 + (i as u32 * 5) % 27);
        let rel = format!("img/{i:04}.{ext}");
        pattern(w, h, i as u32).save_with_format(root.join(&rel), fmt).unwrap();
        // Labels by name and by number; a box on every third sample.
        let label = if i % 2 == 0 { classes[i % 3].to_owned() } else { (i % 3).to_string() };
        let bbox = if i % 3 == 0 { format!("{},{},{},{}", 2, 3, w - 5, h - 4) } else { ",,,".to_owned() };
        lines.push(format!("{rel},{label},s{i:04},{bbox},"));
        expected.insert(format!("s{i:04}"), Status::Ok);
    }
    let jpeg = {
        let mut buf = std::io::Cursor::new(Vec::new());
        pattern(64, 48, 99).write_to(&mut buf, ImageFormat::Jpeg).unwrap();
        buf.into_inner()
    };
    std::fs::write(root.join("bad/zero.jpg"), b"").unwrap();
    std::fs::write(root.join("bad/truncated.jpg"), &jpeg[..jpeg.len() * 6 / 10]).unwrap();
    std::fs::write(root.join("bad/text.png"), b"this is not an image\n").unwrap();
    std::fs::create_dir_all(root.join("bad/dir.jpg")).unwrap();
    pattern(200, 150, 7).save(root.join("bad/huge.png")).unwrap();
    std::fs::write(root.join("bad/good.jpg"), &jpeg).unwrap();
    let bad = [
        ("bad/missing.jpg", "circle", "x_missing", Status::Missing, ""),
        ("bad/zero.jpg", "circle", "x_zero", Status::DecodeError, ""),
        ("bad/truncated.jpg", "square", "x_truncated", Status::DecodeError, ""),
        ("bad/text.png", "square", "x_text", Status::DecodeError, ""),
        ("bad/dir.jpg", "triangle", "x_dir", Status::Unreadable, ""),
        ("bad/huge.png", "triangle", "x_huge", Status::TooLarge, ""),
        ("bad/good.jpg", "dog", "x_label_name", Status::BadLabel, ""),
        ("bad/good.jpg", "7", "x_label_range", Status::BadLabel, ""),
        ("bad/good.jpg", "circle", "x_mask", Status::BadMask, "bad/no-such-mask.png"),
    ];
    for (path, label, id, status, mask) in bad {
        lines.push(format!("{path},{label},{id},,,,,{mask}"));
        expected.insert(id.to_owned(), status);
    }
    std::fs::write(root.join("samples.csv"), lines.join("\n") + "\n").unwrap();
    Dataset { dir: root.to_path_buf(), expected }
}

pub(crate) fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).as_any().downcast_ref::<T>().unwrap()
}

/// id → (status, map PNG) of every row of an output folder; each id must appear once.
pub(crate) fn rows_by_id(dir: &Path) -> BTreeMap<String, (String, Option<Vec<u8>>)> {
    let b = read_all(dir);
    let (ids, st, png) =
        (col::<StringArray>(&b, "id"), col::<StringArray>(&b, "status"), col::<BinaryArray>(&b, "map_png"));
    let mut m = BTreeMap::new();
    for i in 0..b.num_rows() {
        let map = png.is_valid(i).then(|| png.value(i).to_vec());
        assert!(m.insert(ids.value(i).to_owned(), (st.value(i).to_owned(), map)).is_none(), "{} twice", ids.value(i));
    }
    m
}

/// Asserts that two outputs of the same samples agree row for row: the same ids and statuses,
/// and each map's scale within 1e-4 (relative) and its pixels within one quantisation level (a
/// different batch composition or placement may move a value by one). Ids in `except` are left
/// out of the comparison.
pub(crate) fn assert_outputs_agree(want: &Path, got: &Path, what: &str, except: &[&str]) {
    /// A row's status, and its map's PNG and scale.
    type Row = (String, Option<(Vec<u8>, f32)>);
    let by_id = |dir: &Path| -> BTreeMap<String, Row> {
        let b = read_all(dir);
        let (ids, st) = (col::<StringArray>(&b, "id"), col::<StringArray>(&b, "status"));
        let (png, scale) = (col::<BinaryArray>(&b, "map_png"), col::<Float32Array>(&b, "map_scale"));
        let mut m = BTreeMap::new();
        for i in 0..b.num_rows() {
            let map = png.is_valid(i).then(|| (png.value(i).to_vec(), scale.value(i)));
            let id = ids.value(i);
            assert!(m.insert(id.to_owned(), (st.value(i).to_owned(), map)).is_none(), "{what}: {id} twice");
        }
        m.retain(|id, _| !except.contains(&id.as_str()));
        m
    };
    let (want, got) = (by_id(want), by_id(got));
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "{what}: the same samples");
    let mut maps = 0;
    for (id, (status, map)) in &want {
        let (s, m) = &got[id];
        assert_eq!(s, status, "{what} {id}: status");
        assert_eq!(m.is_some(), map.is_some(), "{what} {id}: map on one side only");
        if let (Some((pa, sa)), Some((pb, sb))) = (map, m) {
            assert!((sa - sb).abs() <= 1e-4 * sa.abs(), "{what} {id}: map scale {sa} vs {sb}");
            let (a, ..) = stats::decode_map_png(pa, *sa).unwrap();
            let (b, ..) = stats::decode_map_png(pb, *sb).unwrap();
            assert_eq!(a.len(), b.len(), "{what} {id}: map size");
            let level = sa / 255.0;
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1.01 * level + 1e-6 * sa, "{what} {id}: maps differ by {} levels", worst / level);
            maps += 1;
        }
    }
    assert!(maps > 0, "{what}: no maps compared");
}

/// All rows of an output folder as one batch.
pub(crate) fn read_all(dir: &Path) -> RecordBatch {
    let batches = read_rows(dir).unwrap();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

pub(crate) fn write_job(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    let job = format!(
        r#"[dataset]
manifest = "samples.csv"

[model]
path = "{}"

[preprocess]
max_pixels = 20000

[attribution]
target = "label"

[runtime]
batch_size = 16

[output]
path = "out"
map_size = 16
rows_per_part = 50
{extra}"#,
        model.display()
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, job).unwrap();
    p
}

/// Twelve good images of six formats and sizes, labels 0, 1, 2 by turns, ids `s00`…, in
/// `dir/samples.csv`; every third with a box (in original pixels, off the pixel grid), every
/// fourth from the second with a mask (a rectangle, as a PNG of the image's size).
fn clean_dataset(dir: &Path) {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut lines = vec!["path,label,id,bbox_x0,bbox_y0,bbox_x1,bbox_y1,mask".to_owned()];
    for i in 0..12u32 {
        let (ext, fmt) = FORMATS[i as usize % FORMATS.len()];
        let (w, h) = (40 + i * 9 % 37, 33 + i * 13 % 41);
        let rel = format!("img/{i:02}.{ext}");
        pattern(w, h, 100 + i).save_with_format(dir.join(&rel), fmt).unwrap();
        let (fw, fh) = (w as f32, h as f32);
        let bbox = if i % 3 == 0 {
            format!("{:.3},{:.3},{:.3},{:.3}", 0.21 * fw + 0.37, 0.13 * fh + 0.29, 0.77 * fw + 0.11, 0.69 * fh + 0.43)
        } else {
            ",,,".to_owned()
        };
        let mask = if i % 4 == 1 {
            let m = image::GrayImage::from_fn(w, h, |x, y| {
                image::Luma([if (w / 4..w * 3 / 4).contains(&x) && y >= h / 3 { 255 } else { 0 }])
            });
            let rel = format!("img/{i:02}-mask.png");
            m.save(dir.join(&rel)).unwrap();
            rel
        } else {
            String::new()
        };
        lines.push(format!("{rel},{},s{i:02},{bbox},{mask}", i % 3));
    }
    std::fs::write(dir.join("samples.csv"), lines.join("\n") + "\n").unwrap();
}

/// `scripts/captum_reference.py` over `dir/samples.csv` with the eager `weights`: id → what
/// PIL, torchvision and Captum make of the sample.
fn captum_reference(dir: &Path, weights: &Path, gray: bool) -> serde_json::Value {
    let reference = dir.join("reference.json");
    let st = Command::new(crate::common::python())
        .arg(crate::common::repo().join("scripts/captum_reference.py"))
        .args([dir.join("samples.csv").as_path(), weights, reference.as_path()])
        .args(gray.then_some("--gray"))
        .args(["--region", "top_right:0.5,0.0,1.0,0.5"])
        .env("PYTHONWARNINGS", "ignore")
        .status()
        .unwrap();
    assert!(st.success(), "captum_reference.py failed");
    serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap()
}

/// The product's promise end to end: a run over image files gives, for every sample, the
/// statistics of Captum's GuidedGradCam (and LayerGradCam) on the input torchvision's eval
/// transform makes of PIL's image, with the eager model (`scripts/captum_reference.py`), and
/// its stored map and CAM; statistics computed on the host and on the device alike.
#[test]
fn a_run_over_image_files_equals_captum_on_torchvisions_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    clean_dataset(dir);
    let cases = engine_cases().join("pipeline");
    let reference = captum_reference(dir, &cases.join("model_eager.pth"), false);

    let count = |k: &str| reference.as_object().unwrap().values().filter(|v| !v[k].is_null()).count();
    assert_eq!((count("bbox_mass_share"), count("mask_mass_share")), (4, 3), "the reference has boxes and masks");
    let region = "\n[[regions]]\nname = \"top_right\"\nx0 = 0.5\ny0 = 0.0\nx1 = 1.0\ny1 = 0.5\n";
    let job = write_job(dir, &cases.join("model.pt"), region);
    let text = std::fs::read_to_string(&job).unwrap();
    for (name, stats_on_device) in [("host", false), ("device", true)] {
        let variant = dir.join(format!("{name}.toml"));
        let runtime = format!("batch_size = 5\nstats_on_device = {stats_on_device}");
        std::fs::write(&variant, text.replace("batch_size = 16", &runtime)).unwrap();
        let out = dir.join(name);
        let o = Command::new(bin()).args(["-q", "run"]).arg(&variant).arg("--output").arg(&out).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        let rows = read_all(&out);
        assert_eq!(rows.num_rows(), 12);
        let ids = col::<StringArray>(&rows, "id");
        let status = col::<StringArray>(&rows, "status");
        let predicted = col::<Int64Array>(&rows, "predicted");
        for i in 0..rows.num_rows() {
            let id = ids.value(i);
            let want = &reference[id];
            assert_eq!(status.value(i), "ok", "{name} {id}");
            assert_eq!(predicted.value(i), want["predicted"].as_i64().unwrap(), "{name} {id}: predicted");
            // Relative to the value for totals and maxima, absolute for shares and centres.
            let checks = [
                ("predicted_prob", 1e-5, false),
                ("target_prob", 1e-5, false),
                ("attr_total", 1e-4, true),
                ("attr_max", 1e-4, true),
                ("cam_max", 1e-4, true),
                ("attr_entropy", 1e-5, false),
                ("attr_gini", 1e-5, false),
                ("attr_top5_share", 1e-5, false),
                ("attr_com_x", 1e-5, false),
                ("attr_com_y", 1e-5, false),
                ("attr_peak_x", 1e-6, false),
                ("attr_peak_y", 1e-6, false),
                ("cam_com_x", 1e-5, false),
                ("cam_com_y", 1e-5, false),
                ("bbox_mass_share", 1e-5, false),
                ("mask_mass_share", 1e-5, false),
                ("region_top_right_share", 1e-5, false),
            ];
            for (k, tol, relative) in checks {
                let column = col::<Float32Array>(&rows, k);
                // No box or mask: null in the output as in the reference.
                if k.starts_with("bbox") || k.starts_with("mask") {
                    assert_eq!(column.is_valid(i), !want[k].is_null(), "{name} {id}: {k} null on one side only");
                    if want[k].is_null() {
                        continue;
                    }
                }
                let got = column.value(i) as f64;
                let want = want[k].as_f64().unwrap_or_else(|| panic!("{id}: reference has no {k}"));
                let scale = if relative { want.abs().max(1e-12) } else { 1.0 };
                assert!((got - want).abs() <= tol * scale, "{name} {id}: {k} {got} vs Captum's {want}");
            }
            // The stored maps: the PNG within one of its 255 levels, the float16 CAM within its
            // rounding.
            let floats = |k: &str| -> Vec<f32> {
                want[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
            };
            let (map, cam) = (floats("map"), floats("cam"));
            let scale = col::<Float32Array>(&rows, "map_scale").value(i);
            let (got, _, _) = stats::decode_map_png(col::<BinaryArray>(&rows, "map_png").value(i), scale).unwrap();
            let max = map.iter().cloned().fold(0f32, f32::max);
            assert_eq!(got.len(), map.len(), "{name} {id}: map size");
            for (a, b) in got.iter().zip(&map) {
                assert!((a - b).abs() <= max / 255.0 + 1e-4 * max, "{name} {id}: map {a} vs Captum's {b} (max {max})");
            }
            let got = stats::decode_cam_f16(col::<BinaryArray>(&rows, "cam").value(i));
            let cmax = cam.iter().cloned().fold(0f32, f32::max);
            assert_eq!(got.len(), cam.len(), "{name} {id}: CAM size");
            for (a, b) in got.iter().zip(&cam) {
                assert!((a - b).abs() <= 1e-3 * cmax.max(1e-12) + 1e-7, "{name} {id}: CAM {a} vs Captum's {b}");
            }
        }
    }
}

/// A model that runs out of memory inside its TorchScript forward for batches over 2 (a 4 TiB
/// allocation the CPU allocator refuses at once): libtorch reports that wrapped in the
/// interpreter's traceback, and the run still takes it for running out of memory. Every sample
/// is processed, the workers keep to batches of 2, and the rows equal a run of the plain model.
#[test]
fn out_of_memory_inside_a_torchscript_forward_shrinks_the_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 40);
    let plain = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    let st =
        Command::new(bin()).args(["-q", "run"]).arg(&plain).arg("--output").arg(ds.dir.join("plain")).status().unwrap();
    assert_eq!(st.code(), Some(1), "some samples of the dataset are bad on purpose");
    let greedy = write_job(&ds.dir, &engine_cases().join("pipeline/model_oom_over_2.pt"), "");
    let o = Command::new(bin()).args(["run"]).arg(&greedy).arg("--output").arg(ds.dir.join("greedy")).output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(log.contains("can't allocate memory") && !log.contains("TorchScript interpreter"), "{log}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ds.dir.join("greedy/_run-00000-of-00001.json")).unwrap())
            .unwrap();
    assert_eq!(summary["batch_size_after_out_of_memory"], 2, "{summary}");
    let got = rows_by_id(&ds.dir.join("greedy"));
    assert_eq!(got.len(), ds.expected.len());
    assert_outputs_agree(
        &ds.dir.join("plain"),
        &ds.dir.join("greedy"),
        "batches split after running out of memory",
        &[],
    );
    assert_eq!(got.values().filter(|(s, _)| s == "ok").count(), 40);
}

/// `run` over a few hundred images in many batches: one row per input sample, the right
/// statuses, statistics in range, and maps that dequantise to agree with the engine run on the
/// same preprocessed tensors (batches after the first included). A rerun resumes.
#[test]
fn run_end_to_end_with_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 240);
    let model = engine_cases().join("pipeline/model.pt");
    let job =
        write_job(&ds.dir, &model, "\n[[regions]]\nname = \"top_right\"\nx0 = 0.5\ny0 = 0.0\nx1 = 1.0\ny1 = 0.5\n");

    let v = Command::new(bin()).arg("validate").arg(&job).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let plan = String::from_utf8_lossy(&v.stdout);
    assert!(plan.contains("samples: 249 in the dataset"), "{plan}");
    assert!(plan.contains("2 with a bad label"), "{plan}");
    // Its output read by something that stops early (`| head -1`): stdout closed before the
    // plan is written is not a failure of the command.
    let mut head = Command::new(bin())
        .arg("validate")
        .arg(&job)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(head.stdout.take());
    let closed = head.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert_eq!(closed.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("internal error") && !stderr.contains("panicked"), "{stderr}");

    let out = Command::new(bin()).arg("run").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "some samples fail → exit 1\n{stderr}");
    // The closing line names the first few failed files.
    assert!(stderr.contains("9 sample(s) failed; this run's first: bad/") && stderr.contains(", …"), "{stderr}");
    let rows = read_all(&ds.dir.join("out"));
    assert_eq!(rows.num_rows(), ds.expected.len(), "one row per input sample");
    assert!(String::from_utf8_lossy(&out.stdout).contains("samples processed"), "the run's summary");

    let ids = col::<StringArray>(&rows, "id");
    let status = col::<StringArray>(&rows, "status");
    let error = col::<StringArray>(&rows, "error");
    let index = col::<UInt64Array>(&rows, "index");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..rows.num_rows() {
        let id = ids.value(i);
        assert!(seen.insert(id.to_owned()), "{id} twice");
        assert_eq!(index.value(i), i as u64, "rows in index order");
        let want = ds.expected[id];
        assert_eq!(status.value(i), want.as_str(), "{id}: {:?}", error.is_valid(i).then(|| error.value(i)));
        if want != Status::Ok {
            let msg = error.value(i);
            assert!(!msg.is_empty(), "{id}: failure without a message");
            if id != "x_label_name" && id != "x_label_range" && id != "x_mask" {
                let path = col::<StringArray>(&rows, "path").value(i);
                assert!(msg.contains(path), "{id}: message does not name its file {path}: {msg}");
            }
        }
    }
    assert!(error.value(ids.iter().position(|v| v == Some("x_label_name")).unwrap()).contains("dog"));
    let range = error.value(ids.iter().position(|v| v == Some("x_label_range")).unwrap());
    assert!(range.contains("label 7 ") && range.contains("3 classes"), "{range}");
    assert!(error.value(ids.iter().position(|v| v == Some("x_mask")).unwrap()).contains("no-such-mask.png"));

    // Statistics in range on every ok row.
    let f = |name: &str| col::<Float32Array>(&rows, name);
    let (ok_rows, target, label) = (
        (0..rows.num_rows()).filter(|&i| status.value(i) == "ok").collect::<Vec<_>>(),
        col::<Int64Array>(&rows, "target"),
        col::<Int64Array>(&rows, "label"),
    );
    assert_eq!(ok_rows.len(), 240);
    for &i in &ok_rows {
        assert_eq!(target.value(i), label.value(i), "target = label");
        for name in ["attr_entropy", "attr_gini", "attr_top5_share", "attr_com_x", "attr_com_y", "attr_peak_x"] {
            let v = f(name).value(i);
            assert!((0.0..=1.0).contains(&v), "{name} = {v} out of 0..1");
        }
        for name in ["predicted_prob", "target_prob", "region_top_right_share"] {
            let v = f(name).value(i);
            assert!((0.0..=1.0 + 1e-6).contains(&v), "{name} = {v}");
        }
        assert!(f("attr_total").value(i) > 0.0 && f("attr_max").value(i) <= f("attr_total").value(i));
        assert_eq!(f("bbox_mass_share").is_valid(i), ids.value(i)[1..].parse::<usize>().unwrap() % 3 == 0);
        assert!(f("mask_mass_share").is_null(i));
    }

    // Maps against the engine on the same preprocessed tensors, from several batches.
    let pre = Preprocess {
        resize: Resize::ShorterSide(36),
        crop: Some((32, 32)),
        max_pixels: 20000,
        jpeg_dct_scaling: false,
    };
    let engine = GuidedGradCam::load(&model, Device::Cpu, EngineOptions::default()).unwrap();
    let mean = Tensor::from_slice(&[0.5f32, 0.4, 0.3]).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&[0.25f32, 0.2, 0.3]).view([1, 3, 1, 1]);
    let paths = col::<StringArray>(&rows, "path");
    let (png, scale) = (col::<BinaryArray>(&rows, "map_png"), f("map_scale"));
    let (cam, cam_h, cam_w) =
        (col::<BinaryArray>(&rows, "cam"), col::<UInt32Array>(&rows, "cam_h"), col::<UInt32Array>(&rows, "cam_w"));
    for &i in ok_rows.iter().step_by(37) {
        let d = decode::decode_file(ds.dir.join(paths.value(i)), &pre).unwrap();
        let x = Tensor::from_slice(&d.rgb).view([1, 32, 32, 3]).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0;
        let x = (x - &mean) / &std;
        let r = engine.attribute(&x, &[Some(label.value(i))]).unwrap();
        let map: Vec<f32> =
            Vec::try_from(r.attribution.abs().sum_dim_intlist(&[1i64][..], false, Kind::Float).flatten(0, -1)).unwrap();
        let want = stats::resize_map(&map, 32, 32, 16);
        let (got, h, w) = stats::decode_map_png(png.value(i), scale.value(i)).unwrap();
        assert_eq!((h, w), (16, 16));
        let max = want.iter().cloned().fold(0f32, f32::max);
        assert!((scale.value(i) - max).abs() <= 1e-4 * max, "{}: scale {} vs {max}", ids.value(i), scale.value(i));
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= max / 255.0 + 1e-6 * max, "{}: map {a} vs {b} (max {max})", ids.value(i));
        }
        let cam_ref: Vec<f32> = Vec::try_from(r.cam.flatten(0, -1)).unwrap();
        let cam_got = stats::decode_cam_f16(cam.value(i));
        assert_eq!(
            (cam_h.value(i) as i64, cam_w.value(i) as i64),
            (r.cam.size()[2], r.cam.size()[3]),
            "{}: cam shape",
            ids.value(i)
        );
        assert_eq!(cam_got.len(), cam_ref.len(), "{}: cam length", ids.value(i));
        let cmax = cam_ref.iter().cloned().fold(0f32, f32::max);
        for (a, b) in cam_got.iter().zip(&cam_ref) {
            assert!((a - b).abs() <= 1e-3 * cmax.max(1e-12) + 1e-7, "cam {a} vs {b}");
        }
    }

    // Committed parts and _SUCCESS; a rerun keeps every part and computes nothing.
    let out_dir = ds.dir.join("out");
    let parts: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("part-"))
        .collect();
    assert_eq!(parts.len(), ds.expected.len().div_ceil(50));
    let success: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("_SUCCESS")).unwrap()).unwrap();
    assert_eq!(success["rows"], ds.expected.len());
    assert_eq!(success["status_counts"]["decode_error"], 3);
    let mtime = |n: &str| std::fs::metadata(out_dir.join(n)).unwrap().modified().unwrap();
    let before: Vec<_> = parts.iter().map(|p| mtime(p)).collect();
    let again = Command::new(bin()).arg("run").arg(&job).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("0 of 0 samples processed") && text.contains("249 kept from an earlier run"), "{text}");
    let after: Vec<_> = parts.iter().map(|p| mtime(p)).collect();
    assert_eq!(before, after, "committed parts are kept, not recomputed");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("_run-00000-of-00001.json")).unwrap()).unwrap();
    assert_eq!(summary["resumed_rows"], 249);
    // This run failed nothing; the shard's failed rows (what exit 1 counts) are there too.
    assert_eq!((summary["failed"].as_u64(), summary["shard_failed"].as_u64()), (Some(0), Some(9)), "{summary}");
    assert_eq!(summary["shard_counts"]["decode_error"], 3, "{summary}");
    assert_eq!(summary["shard_counts"]["ok"], 240, "{summary}");

    // -q: another rerun prints no summary, no log line and no bar; the failed
    // samples behind exit 1 are still named on stderr.
    let quiet = Command::new(bin()).args(["-q", "run"]).arg(&job).output().unwrap();
    let quiet_err = String::from_utf8_lossy(&quiet.stderr);
    assert_eq!(quiet.status.code(), Some(1), "{quiet_err}");
    assert_eq!(String::from_utf8_lossy(&quiet.stdout), "", "-q prints no summary");
    assert_eq!(quiet_err.trim(), "9 sample(s) failed (their rows carry the status and error)", "{quiet_err}");
    assert_eq!(read_all(&ds.dir.join("out")).num_rows(), ds.expected.len());
}

/// A fake engine: the map is the image's red channel, the CAM its 2×2 block means. Shares of
/// boxes, masks and regions mapped through resize and crop are then known exactly.
struct RedChannel;

impl Attributor for RedChannel {
    fn name(&self) -> String {
        "fake".into()
    }
    fn attribute(&mut self, b: &U8Batch) -> anyhow::Result<Vec<SampleMaps>> {
        let hw = b.h * b.w;
        Ok((0..b.n)
            .map(|i| {
                let map: Vec<f32> = (0..hw).map(|p| b.data[(i * hw + p) * 3] as f32).collect();
                let cam = stats::resize_map(&map, b.h, b.w, 2);
                SampleMaps {
                    target: b.targets[i].unwrap_or(0),
                    predicted: 0,
                    predicted_prob: 1.0,
                    target_prob: 1.0,
                    map: MapOut::Full(map),
                    cam,
                    cam_h: 2,
                    cam_w: 2,
                }
            })
            .collect())
    }
}

/// A fake engine that panics (a bug, not a libtorch error) on a batch holding an image whose
/// first red value is 7, and otherwise behaves as [`RedChannel`].
struct PanicsOnSeven;

impl Attributor for PanicsOnSeven {
    fn name(&self) -> String {
        "panics".into()
    }
    fn attribute(&mut self, b: &U8Batch) -> anyhow::Result<Vec<SampleMaps>> {
        let hw = b.h * b.w;
        if (0..b.n).any(|i| b.data[i * hw * 3] == 7) {
            panic!("index out of bounds: the fake's bug");
        }
        RedChannel.attribute(b)
    }
}

/// A fake engine whose device breaks for good after `ok_calls` calls (a sticky CUDA error);
/// before that, and when `bad_red` marks one image, it fails only batches holding that image.
struct BreaksAfter {
    ok_calls: usize,
    bad_red: Option<u8>,
}

impl Attributor for BreaksAfter {
    fn name(&self) -> String {
        "cuda:9".into()
    }
    fn attribute(&mut self, b: &U8Batch) -> anyhow::Result<Vec<SampleMaps>> {
        if self.ok_calls == 0 {
            anyhow::bail!("CUDA error: an illegal memory access was encountered");
        }
        self.ok_calls -= 1;
        let hw = b.h * b.w;
        if (0..b.n).any(|i| Some(b.data[i * hw * 3]) == self.bad_red) {
            anyhow::bail!("this image breaks the model");
        }
        RedChannel.attribute(b)
    }
}

/// A fake engine that warms up (`Attributor::warm_up_thread`, 300 ms) and records on which
/// thread it warmed up and ran each batch, and when, in `log`.
struct RecordsThreads {
    log: Arc<std::sync::Mutex<Vec<(String, std::thread::ThreadId, std::time::Instant)>>>,
    fail_warm_up: bool,
}

impl Attributor for RecordsThreads {
    fn name(&self) -> String {
        "records".into()
    }
    fn attribute(&mut self, b: &U8Batch) -> anyhow::Result<Vec<SampleMaps>> {
        self.log.lock().unwrap().push((
            format!("batch {}", b.n),
            std::thread::current().id(),
            std::time::Instant::now(),
        ));
        RedChannel.attribute(b)
    }
    fn warm_up_thread(&mut self, n: usize, h: usize, w: usize, boxes: bool, masks: bool) -> anyhow::Result<bool> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let what = format!("warm-up {n} {h}x{w} {boxes} {masks}");
        self.log.lock().unwrap().push((what, std::thread::current().id(), std::time::Instant::now()));
        anyhow::ensure!(!self.fail_warm_up, "out of memory in the fake's warm-up");
        Ok(true)
    }
}

/// Each worker warms its replica up on its own thread (libtorch keeps cuDNN's benchmark choices
/// per thread) with the shape of the batches to come, once, before any of its batches; the
/// clock starts after every worker has (`warmup_time`, not `elapsed`); a warm-up that fails is
/// only a warning, and every sample still gets its row.
#[test]
fn each_worker_warms_up_on_its_own_thread_before_its_batches() {
    for fail_warm_up in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let (mut samples, mut cfg) = images(tmp.path(), &[10, 20, 30, 40, 50, 60, 70]);
        cfg.batch_size = 3;
        samples[4].bbox = Some([1.0, 1.0, 8.0, 8.0]);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let replicas: Vec<Box<dyn Attributor>> = (0..2)
            .map(|_| Box::new(RecordsThreads { log: log.clone(), fail_warm_up }) as Box<dyn Attributor>)
            .collect();
        let started = std::time::Instant::now();
        let summary = pipeline::run(
            cfg,
            samples,
            replicas,
            Arc::new(AtomicBool::new(false)),
            Arc::new(Progress::default()),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(summary.processed(), 7, "every sample has its row");
        let log = log.lock().unwrap();
        let warm: Vec<_> = log.iter().filter(|(what, ..)| what.starts_with("warm-up")).collect();
        assert_eq!(warm.len(), 2, "one warm-up per worker: {log:?}");
        assert!(warm.iter().all(|(what, ..)| what == "warm-up 3 16x16 true false"), "{log:?}");
        assert_ne!(warm[0].1, warm[1].1, "each on its own thread");
        let last_warm = warm.iter().map(|w| w.2).max().unwrap();
        for (what, thread, at) in log.iter().filter(|(what, ..)| what.starts_with("batch")) {
            assert!(warm.iter().any(|w| w.1 == *thread), "{what} ran on a thread that did not warm up");
            assert!(*at >= last_warm, "{what} ran before every worker had warmed up");
        }
        assert!(summary.warmup_time >= std::time::Duration::from_millis(300), "{:?}", summary.warmup_time);
        assert!(summary.elapsed + summary.warmup_time <= started.elapsed(), "the warm-up is not in `elapsed`");
    }
}

/// Six 16×16 images, red values `reds`, as samples of `dir`, and a pipeline config writing
/// parts of 2 rows into `dir/out` with batches of 2.
fn six_images(dir: &Path, reds: [u8; 6]) -> (Vec<Sample>, PipelineConfig) {
    images(dir, &reds)
}

/// [`six_images`] with any number of images.
fn images(dir: &Path, reds: &[u8]) -> (Vec<Sample>, PipelineConfig) {
    let samples: Vec<Sample> = reds
        .iter()
        .copied()
        .enumerate()
        .map(|(i, red)| {
            let file = format!("s{i}.png");
            RgbImage::from_pixel(16, 16, Rgb([red, 0, 0])).save(dir.join(&file)).unwrap();
            Sample {
                index: i as u64,
                id: format!("s{i}"),
                path: file.clone(),
                location: dir.join(&file).into(),
                label: Some(0),
                label_error: None,
                bbox: None,
                box_error: None,
                mask: None,
            }
        })
        .collect();
    let cfg = PipelineConfig {
        preprocess: Preprocess {
            resize: Resize::Exact { h: 16, w: 16 },
            crop: None,
            max_pixels: 1 << 20,
            jpeg_dct_scaling: false,
        },
        target: TargetMode::Label,
        batch_size: 2,
        decode_threads: 2,
        map_size: 4,
        regions: vec![],
        sink: SinkConfig {
            dir: dir.join("out").into(),
            shard: 0,
            num_shards: 1,
            total_rows: samples.len() as u64,
            rows_per_part: 2,
            regions: vec![],
            metadata: vec![],
            job_id: "job".into(),
            retry_statuses: Default::default(),
        },
        fingerprint: "six".into(),
        store_failures_as_rows: false,
        shard_lock: None,
    };
    (samples, cfg)
}

fn run_six(samples: Vec<Sample>, cfg: PipelineConfig, engine: Box<dyn Attributor>) -> anyhow::Result<RunSummary> {
    pipeline::run(
        cfg,
        samples,
        vec![engine],
        Arc::new(AtomicBool::new(false)),
        Arc::new(Progress::default()),
        |_, _| {},
    )
}

/// `run --retry-failed[=STATUS,…]` after the files are fixed: the failed samples of those
/// statuses are attributed again and their rows replaced, each sample keeps one row, ok rows and
/// parts without a failed row stay as they were, and a status name that is not a failure is
/// refused (exit 2).
#[test]
fn retry_failed_redoes_failed_samples_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 12);
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    let text = std::fs::read_to_string(&job).unwrap().replace("rows_per_part = 50", "rows_per_part = 5");
    std::fs::write(&job, text).unwrap();
    let out = ds.dir.join("out");
    let run = |extra: &[&str]| Command::new(bin()).arg("run").arg(&job).args(extra).output().unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let first = rows_by_id(&out);
    // `validate` reads what the folder holds and says what a retry would do: seven failed rows
    // (not the two bad labels).
    let v = Command::new(bin()).arg("validate").arg(&job).output().unwrap();
    let said = String::from_utf8_lossy(&v.stdout);
    assert!(
        said.contains(
            "5 of 5 parts of this shard committed, 21 rows (12 ok, failed: missing 1, unreadable 1, decode_error 3"
        ) && said.contains("the shard is complete")
            && said.contains("run --retry-failed would redo 7 of the failed samples"),
        "{said}"
    );
    assert_eq!(v.status.code(), Some(0));
    // Another job over the same folder: `validate` fails where `run` would (exit 2).
    let other = ds.dir.join("other.toml");
    std::fs::write(&other, std::fs::read_to_string(&job).unwrap().replace("rows_per_part = 5", "rows_per_part = 4"))
        .unwrap();
    let v = Command::new(bin()).arg("validate").arg(&other).output().unwrap();
    let said = String::from_utf8_lossy(&v.stdout);
    assert!(said.contains("a run would refuse this folder (exit 2)"), "{said}");
    assert_eq!(v.status.code(), Some(2), "{said}");
    assert_eq!(Command::new(bin()).arg("run").arg(&other).output().unwrap().status.code(), Some(2));
    // One setting changed (and the batch size, which changes nothing written): the refusal names it.
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&other, text.replace("map_size = 16", "map_size = 32").replace("batch_size = 16", "batch_size = 4"))
        .unwrap();
    let o = Command::new(bin()).arg("run").arg(&other).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("holds another job's output")
            && err.contains("it differs from that job in output.map_size (16 → 32)"),
        "{err}"
    );
    assert!(!err.contains("batch_size"), "{err}");
    // The same settings over other samples (with a default written out, which changes the spec's
    // text, not its settings): the samples are named.
    let same_settings = text
        .replace("samples.csv", "renamed.csv")
        .replace("[attribution]\n", "[attribution]\ninterpolate_mode = \"nearest\"\n");
    assert_ne!(same_settings, text.replace("samples.csv", "renamed.csv"));
    std::fs::write(&other, same_settings).unwrap();
    let manifest = std::fs::read_to_string(ds.dir.join("samples.csv")).unwrap();
    std::fs::write(ds.dir.join("renamed.csv"), manifest.replacen(",s0000,", ",first,", 1)).unwrap();
    let said =
        String::from_utf8_lossy(&Command::new(bin()).arg("validate").arg(&other).output().unwrap().stdout).into_owned();
    assert!(said.contains("its model and settings are that job's, so its samples do"), "{said}");
    // The twelve good samples come first: parts 0 and 1 hold only ok rows.
    let clean: Vec<Vec<u8>> =
        (0..2).map(|k| std::fs::read(out.join(format!("part-00000-of-00001-{k:06}.parquet"))).unwrap()).collect();

    for bad in ["ok", "no_such_status"] {
        let o = run(&[&format!("--retry-failed={bad}")]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("{bad:?} is not a failure status")) && err.contains("decode_error"), "{err}");
        assert!(!err.contains("bad_label"), "{err}");
    }
    // Statuses the manifest decides: a retry could never change them.
    for manifest_decides in ["bad_label", "missing,bad_box"] {
        let o = run(&[&format!("--retry-failed={manifest_decides}")]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("rows cannot be redone: the dataset's labels and boxes decide them"), "{err}");
    }

    // The missing file appears and the empty one gets its picture.
    let good = std::fs::read(ds.dir.join("bad/good.jpg")).unwrap();
    std::fs::write(ds.dir.join("bad/missing.jpg"), &good).unwrap();
    std::fs::write(ds.dir.join("bad/zero.jpg"), &good).unwrap();
    // A report of the output as it was, which the retry then leaves behind: the run says so.
    let report = Command::new(bin()).args(["-q", "report"]).arg(&out).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let o = run(&["--retry-failed=missing"]);
    assert_eq!(o.status.code(), Some(1), "the other bad samples still fail: {}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("its _report is older than this run's rows; run `saliency-audit report"), "{err}");
    // A report made after the last part: finalize has nothing to say of it.
    let report = Command::new(bin()).args(["-q", "report"]).arg(&out).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let f = Command::new(bin()).arg("finalize").arg(&out).output().unwrap();
    let said = String::from_utf8_lossy(&f.stderr);
    assert!(f.status.success() && !said.contains("_report is older"), "{said}");

    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("1 of 1 samples processed") && stdout.contains("1 failed there and redone"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("_run-00000-of-00001.json")).unwrap()).unwrap();
    assert_eq!((summary["to_redo_rows"].as_u64(), summary["redone_rows"].as_u64()), (Some(1), Some(1)), "{summary}");
    let second = rows_by_id(&out);
    assert_eq!(second["x_missing"].0, "ok");
    assert_eq!(second["x_zero"].0, "decode_error", "only the statuses named are redone");

    let o = run(&["--retry-failed"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    // Three decode errors, unreadable, too_large and bad_mask; not the two bad labels, which
    // only the manifest decides.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("6 of 6 samples processed"), "{stdout}");
    let third = rows_by_id(&out);
    assert_eq!(third.len(), ds.expected.len(), "one row per sample");
    assert_eq!(third["x_zero"].0, "ok");
    for (id, want) in &ds.expected {
        if !["x_missing", "x_zero"].contains(&id.as_str()) {
            assert_eq!(third[id].0, want.as_str(), "{id} failed again the same way");
        }
        if *want == Status::Ok {
            assert_eq!(third[id], first[id], "{id}: an ok row is kept as it was");
        }
    }
    for (k, bytes) in clean.iter().enumerate() {
        let now = std::fs::read(out.join(format!("part-00000-of-00001-{k:06}.parquet"))).unwrap();
        assert!(&now == bytes, "part {k} has no failed row and is not written again");
    }
    assert!(out.join("_SUCCESS").exists(), "the single shard finalizes again");
    // A report made now: a rerun with nothing to do (it writes the shard's marker again, no
    // part) and a finalize leave it current, with nothing said of it.
    let report = Command::new(bin()).args(["-q", "report"]).arg(&out).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let again = run(&[]);
    let f = Command::new(bin()).arg("finalize").arg(&out).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&again.stderr), String::from_utf8_lossy(&f.stderr));
    assert!(f.status.success() && !said.contains("_report is older"), "{said}");
}

/// Each part's footer records the job that wrote it: with the folder's job file gone, another
/// job's run is still refused (exit 2) rather than taking the parts as its own, and `validate`
/// says so; the same job resumes from them.
#[test]
fn parts_of_another_job_are_refused_without_the_job_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 4);
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    let out = ds.dir.join("out");
    let run = |job: &Path| Command::new(bin()).arg("run").arg(job).output().unwrap();
    assert_eq!(run(&job).status.code(), Some(1));
    let remove_job_files = || {
        for e in std::fs::read_dir(&out).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("_job-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    };
    remove_job_files();
    let before = rows_by_id(&out);
    // Another setting, or another layout too (which the part's rows do not fit either).
    for (from, to) in [("map_size = 16", "map_size = 8"), ("rows_per_part = 50", "rows_per_part = 5")] {
        let other = ds.dir.join("other.toml");
        std::fs::write(&other, std::fs::read_to_string(&job).unwrap().replace(from, to)).unwrap();
        for cmd in ["validate", "run"] {
            let o = Command::new(bin()).arg(cmd).arg(&other).output().unwrap();
            let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            assert_eq!(o.status.code(), Some(2), "{to}, {cmd}: {said}");
            assert!(
                said.contains("was written by another job") && said.contains("part-00000-of-00001-000000"),
                "{to}, {cmd}: {said}"
            );
        }
    }
    assert_eq!(rows_by_id(&out), before, "nothing changed");
    let o = run(&job);
    let said = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1));
    assert!(said.contains("0 of 0 samples processed") && said.contains("kept from an earlier run"), "{said}");
}

/// A device that fails for good stops the run with its error (exit 3 from the CLI) after the
/// parts already complete are committed; the failing batches get no rows, so a rerun does them,
/// instead of every remaining sample getting an `attribution_error` row. One image that fails
/// on a healthy device still gets its error row.
#[test]
fn a_failing_device_stops_the_run_instead_of_failing_every_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let (samples, cfg) = six_images(tmp.path(), [1, 2, 3, 4, 5, 6]);
    let e = run_six(samples, cfg, Box::new(BreaksAfter { ok_calls: 2, bad_red: None }))
        .expect_err("a failing device ends the run with an error");
    let msg = format!("{e:#}");
    assert!(msg.contains("illegal memory access") && msg.contains("health check") && msg.contains("cuda:9"), "{msg}");
    assert_eq!(saliency_audit::exit::code(&e), saliency_audit::exit::RUN_FAILED, "a retry may get past it");
    let rows = read_all(&tmp.path().join("out"));
    assert_eq!(rows.num_rows(), 4, "the two batches done before are committed");
    let status = col::<StringArray>(&rows, "status");
    assert!((0..4).all(|i| status.value(i) == "ok"), "no error rows for the device's failure");

    // A healthy device: only the image that breaks the model fails.
    let tmp = tempfile::tempdir().unwrap();
    let (samples, cfg) = six_images(tmp.path(), [1, 2, 3, 4, 5, 6]);
    let summary = run_six(samples, cfg, Box::new(BreaksAfter { ok_calls: 1000, bad_red: Some(3) })).unwrap();
    assert_eq!(summary.counts.get(&Status::AttributionError), Some(&1), "{:?}", summary.counts);
    let rows = read_all(&tmp.path().join("out"));
    let error = col::<StringArray>(&rows, "error");
    assert!(error.value(2).contains("this image breaks the model"), "{}", error.value(2));
}

/// A fake engine whose model gives NaN logits for red 2 and a NaN attribution (one map value,
/// or one CAM value) for reds 3 and 4.
struct NotFinite;

impl Attributor for NotFinite {
    fn name(&self) -> String {
        "fake".into()
    }
    fn attribute(&mut self, b: &U8Batch) -> anyhow::Result<Vec<SampleMaps>> {
        let hw = b.h * b.w;
        let mut maps = RedChannel.attribute(b)?;
        for (i, m) in maps.iter_mut().enumerate() {
            match b.data[i * hw * 3] {
                2 => (m.predicted_prob, m.target_prob) = (f32::NAN, f32::NAN),
                3 => match &mut m.map {
                    MapOut::Full(v) => v[5] = f32::INFINITY,
                    MapOut::Reduced { resized, .. } => resized[0] = f32::NAN,
                },
                4 => m.cam[0] = f32::NAN,
                _ => {}
            }
        }
        Ok(maps)
    }
}

/// NaN or infinite logits or attributions are the sample's `attribution_error`, not an `ok` row
/// whose statistics count the bad values as 0.
#[test]
fn non_finite_results_are_attribution_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (samples, cfg) = six_images(tmp.path(), [1, 2, 3, 4, 5, 6]);
    let summary = run_six(samples, cfg, Box::new(NotFinite)).unwrap();
    assert_eq!(summary.counts.get(&Status::AttributionError), Some(&3), "{:?}", summary.counts);
    let rows = read_all(&tmp.path().join("out"));
    let (status, error) = (col::<StringArray>(&rows, "status"), col::<StringArray>(&rows, "error"));
    let got: Vec<(&str, &str)> =
        (0..6).map(|i| (status.value(i), if error.is_valid(i) { error.value(i) } else { "" })).collect();
    assert_eq!(got[0], ("ok", ""));
    assert!(got[1].0 == "attribution_error" && got[1].1.contains("NaN or infinite logits"), "{got:?}");
    for i in [2, 3] {
        assert!(got[i].0 == "attribution_error" && got[i].1.contains("attribution holds NaN"), "{got:?}");
    }
    assert!(got[4..].iter().all(|g| g.0 == "ok"), "{got:?}");
}

/// A fake engine on a device that fits at most `max` images at once, recording the size of every
/// batch it is given; an image whose red value is `bad_red` breaks the model (not a memory error).
struct FitsAtMost {
    max: usize,
    bad_red: Option<u8>,
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
    /// After this many calls every size fits (the memory was taken only for a while).
    until_call: usize,
}

impl Attributor for FitsAtMost {
    fn name(&self) -> String {
        "cuda:0".into()
    }
    fn attribute(&mut self, b: &U8Batch) -> anyhow::Result<Vec<SampleMaps>> {
        let mut sizes = self.sizes.lock().unwrap();
        sizes.push(b.n);
        if b.n > self.max && sizes.len() <= self.until_call {
            anyhow::bail!("libtorch: CUDA out of memory. Tried to allocate 2.00 GiB");
        }
        let hw = b.h * b.w;
        if (0..b.n).any(|i| Some(b.data[i * hw * 3]) == self.bad_red) {
            anyhow::bail!("this image breaks the model");
        }
        RedChannel.attribute(b)
    }
}

/// A batch that runs out of device memory is split, and the worker remembers the size that
/// fitted: later batches go in pieces of that size instead of failing and splitting again. A
/// failure for another reason (one bad image) does not shrink later batches.
#[test]
fn out_of_memory_shrinks_later_batches_and_a_bad_image_does_not() {
    let run = |max: usize, bad_red: Option<u8>, until_call: usize| {
        let tmp = tempfile::tempdir().unwrap();
        let (samples, mut cfg) = six_images(tmp.path(), [1, 2, 3, 4, 5, 6]);
        cfg.batch_size = 3;
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let engine = FitsAtMost { max, bad_red, sizes: sizes.clone(), until_call };
        let summary = run_six(samples, cfg, Box::new(engine)).unwrap();
        let rows = read_all(&tmp.path().join("out"));
        assert_eq!(rows.num_rows(), 6, "every sample has its row");
        let sizes = sizes.lock().unwrap().clone();
        (summary, sizes)
    };
    // 3 fails; its halves 1 and 2: 2 fails too, so 1 and 1. The second batch of 3 goes as 1, 1, 1
    // straight away (before, it failed as 3, then as 2, as the first did).
    let (summary, sizes) = run(1, None, usize::MAX);
    assert_eq!(summary.counts.get(&Status::Ok), Some(&6), "{:?}", summary.counts);
    assert_eq!(sizes, [3, 1, 2, 1, 1, 1, 1, 1]);
    assert_eq!(summary.batch_after_out_of_memory, Some(1));
    // Fits 2: the first batch is split into 1 and 2, and the second goes as 2 and 1.
    let (summary, sizes) = run(2, None, usize::MAX);
    assert_eq!(sizes, [3, 1, 2, 2, 1]);
    assert_eq!(summary.batch_after_out_of_memory, Some(2));
    // Memory taken for a while (by another worker on the device): even one image runs out of
    // memory once, and gets a second try before anything else, which passes.
    let (summary, sizes) = run(0, None, 2);
    assert_eq!(summary.counts.get(&Status::Ok), Some(&6), "{:?}", summary.counts);
    assert_eq!(sizes[..3], [3, 1, 1]);
    // Taken a little longer: the image fails twice and the health check once; the check gets a
    // second try after a longer pause and passes, so the memory is free again: the image gets
    // one last try, which runs, and the run goes on.
    let (summary, sizes) = run(0, None, 4);
    assert_eq!(summary.counts.get(&Status::Ok), Some(&6), "{:?}", summary.counts);
    assert_eq!(sizes[..6], [3, 1, 1, 1, 1, 1]);
    assert_eq!(summary.batch_after_out_of_memory, Some(2));
    // Image 2 breaks the model: its batch is split down to it (and a health check of one image
    // follows), but the second batch still goes whole.
    let (summary, sizes) = run(8, Some(2), usize::MAX);
    assert_eq!(summary.counts.get(&Status::AttributionError), Some(&1), "{:?}", summary.counts);
    assert_eq!(sizes, [3, 1, 2, 1, 1, 1, 3]);
    assert_eq!(summary.batch_after_out_of_memory, None);

    // Memory taken only for a while: after RETRY_FULL_BATCHES_AFTER batches at the lowered size
    // the worker tries the full size again, and keeps it.
    let tmp = tempfile::tempdir().unwrap();
    let retry = pipeline::RETRY_FULL_BATCHES_AFTER;
    let reds: Vec<u8> = (0..2 * (retry + 6)).map(|i| (i % 250 + 1) as u8).collect();
    let (samples, mut cfg) = images(tmp.path(), &reds);
    cfg.batch_size = 2;
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let engine = FitsAtMost { max: 1, bad_red: None, sizes: sizes.clone(), until_call: 3 };
    let summary = run_six(samples, cfg, Box::new(engine)).unwrap();
    assert_eq!(summary.counts.get(&Status::Ok), Some(&(reds.len() as u64)));
    assert_eq!(summary.batch_after_out_of_memory, Some(1));
    let sizes = sizes.lock().unwrap().clone();
    // The first batch: 2 fails, then 1 and 1; `retry` batches as 1 and 1; the last 5 whole.
    let mut want = vec![2, 1, 1];
    want.extend(std::iter::repeat_n(1, 2 * retry));
    want.extend([2; 5]);
    assert_eq!(sizes, want);
}

/// Another worker's peak on the same device, for a moment: a batch of 8 and its halves of 4 and
/// 2 run out of memory, then the rest of its pieces run, the later ones at 2 and 4. The worker
/// keeps to 4 (the largest piece that ran), not to 1 (where the failing halves led); before,
/// every level of the split lowered the size it kept to.
#[test]
fn a_moment_short_of_memory_does_not_drop_a_worker_to_single_images() {
    let tmp = tempfile::tempdir().unwrap();
    let reds: Vec<u8> = (1..=24).collect();
    let (samples, mut cfg) = images(tmp.path(), &reds);
    cfg.batch_size = 8;
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let engine = FitsAtMost { max: 1, bad_red: None, sizes: sizes.clone(), until_call: 3 };
    let summary = run_six(samples, cfg, Box::new(engine)).unwrap();
    assert_eq!(summary.counts.get(&Status::Ok), Some(&24), "{:?}", summary.counts);
    let sizes = sizes.lock().unwrap().clone();
    // 8, 4 and 2 fail; 1, 1, the other 2 and the other 4 run; the next two batches go as 4 and 4.
    assert_eq!(sizes, [8, 4, 2, 1, 1, 2, 4, 4, 4, 4, 4]);
    assert_eq!(summary.batch_after_out_of_memory, Some(4));
}

/// A panic in the engine stage becomes `attribution_error` rows for that batch's samples; the
/// other batches are written, no sample goes missing, and the run ends (no hang).
#[test]
fn a_panicking_batch_fails_its_samples_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (samples, cfg) = six_images(tmp.path(), [3, 7, 9, 11, 7, 5]);
    let out = tmp.path().join("out");
    let summary = run_six(samples, cfg, Box::new(PanicsOnSeven)).expect("the run ends normally");
    // Batches [3, 7] and [7, 5] fail whole; [9, 11] is fine.
    assert_eq!(summary.counts.get(&Status::AttributionError), Some(&4), "{:?}", summary.counts);
    assert_eq!(summary.counts.get(&Status::Ok), Some(&2), "{:?}", summary.counts);
    let rows = read_all(&out);
    assert_eq!(rows.num_rows(), 6, "every sample has its row");
    let status = col::<StringArray>(&rows, "status");
    let error = col::<StringArray>(&rows, "error");
    for (i, want) in ["attribution_error", "attribution_error", "ok", "ok", "attribution_error", "attribution_error"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(status.value(i), want, "row {i}");
        if want != "ok" {
            assert!(error.value(i).contains("internal error") && error.value(i).contains("the fake's bug"), "row {i}");
        }
    }
}

/// A run whose writes fail (here: a file size limit, as a full disk would) exits 3 and leaves
/// no report of an earlier run in the folder, and no temporary files; a rerun without the limit
/// completes.
#[test]
fn a_failing_disk_stops_the_run_with_exit_3() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 20);
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    let out = ds.dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let report = out.join("_run-00000-of-00001.json");
    std::fs::write(&report, "{\"processed\": 250}").unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["-q", "run"]).arg(&job);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit { rlim_cur: 2048, rlim_max: 2048 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert!(!report.exists(), "the earlier run's report is gone");
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp") || n.ends_with(".parquet"))
        .collect();
    assert!(left.iter().all(|n| !n.contains(".tmp")), "temporary files left: {left:?}");
    let o = Command::new(bin()).args(["-q", "run"]).arg(&job).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rows_by_id(&out).len(), ds.expected.len());
}

/// A bug that every batch meets stops the run after three batches in a row (exit 3) instead
/// of filling every remaining row with it.
#[test]
fn a_panic_on_every_batch_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (samples, cfg) = six_images(tmp.path(), [7; 6]);
    let e = run_six(samples, cfg, Box::new(PanicsOnSeven)).expect_err("the run stops");
    assert!(format!("{e:#}").contains("internal error on 3 batches in a row on panics"), "{e:#}");
    assert_eq!(saliency_audit::exit::code(&e), 3);
}

/// Constructed cases: an 80×60 image, red in its top-right quarter only, resized (shorter side
/// 36 → 48×36) and centre-cropped to 32 (left 8, top 2): the red lands in the crop's top-right
/// quarter. Box [40,0,80,30] and a mask of the same area map onto that quarter.
#[test]
fn region_bbox_and_mask_shares_on_constructed_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let mut samples = Vec::new();
    let red_quarter =
        RgbImage::from_fn(80, 60, |x, y| if x >= 40 && y < 30 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 0]) });
    red_quarter.save(tmp.path().join("q.png")).unwrap();
    let mask = image::GrayImage::from_fn(80, 60, |x, y| image::Luma([if x >= 40 && y < 30 { 1 } else { 0 }]));
    mask.save(tmp.path().join("q_mask.png")).unwrap();
    let left_half = RgbImage::from_fn(80, 60, |x, _| if x < 40 { Rgb([200, 0, 0]) } else { Rgb([0, 0, 0]) });
    left_half.save(tmp.path().join("l.png")).unwrap();
    for (i, (file, bbox, mask)) in [
        ("q.png", Some([40.0, 0.0, 80.0, 30.0]), Some("q_mask.png")),
        ("l.png", Some([40.0, 0.0, 80.0, 30.0]), Some("q_mask.png")),
        ("q.png", Some([0.0, 30.0, 40.0, 60.0]), None),
    ]
    .into_iter()
    .enumerate()
    {
        samples.push(Sample {
            index: i as u64,
            id: format!("case{i}"),
            path: file.into(),
            location: tmp.path().join(file).into(),
            label: Some(0),
            label_error: None,
            bbox,
            box_error: None,
            mask: mask.map(|m| tmp.path().join(m).into()),
        });
    }
    let out = tmp.path().join("out");
    let regions = vec![
        Region { name: "top_right".into(), x0: 0.5, y0: 0.0, x1: 1.0, y1: 0.5 },
        Region { name: "bottom_left".into(), x0: 0.0, y0: 0.5, x1: 0.5, y1: 1.0 },
        Region { name: "left".into(), x0: 0.0, y0: 0.0, x1: 0.5, y1: 1.0 },
    ];
    let cfg = PipelineConfig {
        preprocess: Preprocess {
            resize: Resize::ShorterSide(36),
            crop: Some((32, 32)),
            max_pixels: 1 << 20,
            jpeg_dct_scaling: false,
        },
        target: TargetMode::Label,
        batch_size: 2,
        decode_threads: 2,
        map_size: 8,
        regions: regions.clone(),
        sink: SinkConfig {
            dir: out.clone().into(),
            shard: 0,
            num_shards: 1,
            total_rows: 3,
            rows_per_part: 2,
            regions: regions.iter().map(|r| r.name.clone()).collect(),
            metadata: vec![],
            job_id: "job".into(),
            retry_statuses: Default::default(),
        },
        fingerprint: "constructed".into(),
        store_failures_as_rows: false,
        shard_lock: None,
    };
    let summary = pipeline::run(
        cfg,
        samples,
        vec![Box::new(RedChannel)],
        Arc::new(AtomicBool::new(false)),
        Arc::new(Progress::default()),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(summary.counts.get(&Status::Ok), Some(&3));
    let rows = read_all(&out);
    let f = |name: &str, i: usize| col::<Float32Array>(&rows, name).value(i);
    // Antialiased resizing spreads the red edge over about one pixel: shares within 0.04.
    let close = |a: f32, b: f32, what: &str| assert!((a - b).abs() <= 0.04, "{what}: {a} vs {b}");
    close(f("region_top_right_share", 0), 1.0, "case 0 top_right");
    close(f("region_bottom_left_share", 0), 0.0, "case 0 bottom_left");
    close(f("bbox_mass_share", 0), 1.0, "case 0 box");
    close(f("mask_mass_share", 0), 1.0, "case 0 mask");
    assert!(
        (f("bbox_mass_share", 0) - f("region_top_right_share", 0)).abs() < 1e-6,
        "the box maps onto the quarter exactly"
    );
    // Red on the left half: the left region holds it all; none in the top-right box or mask.
    close(f("region_left_share", 1), 1.0, "case 1 left");
    close(f("bbox_mass_share", 1), 0.0, "case 1 box");
    close(f("mask_mass_share", 1), 0.0, "case 1 mask");
    close(f("attr_com_x", 1), 0.5 * (40.0 * 0.6 - 8.0) / 32.0, "case 1 centre of mass x");
    // Box in the bottom-left quarter of the original, where there is no red.
    close(f("bbox_mass_share", 2), 0.0, "case 2 box");
    assert!(col::<Float32Array>(&rows, "mask_mass_share").is_null(2));
    close(f("attr_com_x", 0), 0.75, "case 0 centre of mass x");
    close(f("attr_com_y", 0), 0.25, "case 0 centre of mass y");
    close(f("cam_com_x", 0), 0.75, "case 0 CAM centre of mass x");
}

/// Bad job specs and models fail before any work, exit 2, one message naming the key or file.
/// A store that cannot be reached, or a GPU that was given but cannot be used, is exit 3.
#[test]
fn bad_job_specs_fail_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 6);
    let model = engine_cases().join("pipeline/model.pt");
    // (text replaced, replacement, key the error must name)
    let cases: [(&str, &str, &str); 4] = [
        ("batch_size = 16", "batch_size = 0", "runtime.batch_size"),
        ("batch_size = 16", "batch_size = 16\nthreads = 4", "threads"),
        (
            "map_size = 16",
            "map_size = 16\n[[regions]]\nname = \"r\"\nx0 = 0.5\ny0 = 0.0\nx1 = 0.2\ny1 = 1.0",
            "regions",
        ),
        ("target = \"label\"", "target = \"label\"\ninterpolate_mode = \"cubic\"", "interpolate_mode"),
    ];
    for (from, to, key) in cases {
        let job = write_job(&ds.dir, &model, "");
        let text = std::fs::read_to_string(&job).unwrap().replacen(from, to, 1);
        std::fs::write(&job, text).unwrap();
        let out = Command::new(bin()).arg("run").arg(&job).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {err}");
        assert!(err.contains(key) && err.contains("line"), "{to}: {err}");
        assert!(!ds.dir.join("out").exists(), "no work before validation");
    }
    // A state_dict (torch.save's zip, without code) and a file that is no archive at all, with
    // no preprocessing in the job: the model file is what is wrong, not the missing settings.
    let garbage = ds.dir.join("garbage.pt");
    std::fs::write(&garbage, b"not a model").unwrap();
    for (file, why) in [(engine_cases().join("pipeline/model_eager.pth"), "holds no code/"), (garbage, "not a zip")] {
        let out = Command::new(bin()).arg("validate").arg(write_job(&ds.dir, &file, "")).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("model.path") && err.contains("is not a TorchScript file") && err.contains(why), "{err}");
        assert!(err.contains("scripts/export_model.py") && !err.contains("preprocess"), "{err}");
    }
    // A model that breaks the contract.
    let job = write_job(&ds.dir, &engine_cases().join("bad/single.pt"), "");
    let text = std::fs::read_to_string(&job).unwrap().replace("[preprocess]\n", "[preprocess]\nresize = 8\ncrop = 8\n");
    std::fs::write(&job, text).unwrap();
    let out = Command::new(bin()).arg("run").arg(&job).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("single tensor, not a tuple"), "{err}");
    // With JSON logs, the error is one JSON object, its causes included.
    // (Whatever RUST_LOG filters out.)
    let out =
        Command::new(bin()).args(["--log-format", "json", "run"]).arg(&job).env("RUST_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), err.lines().count()), (Some(2), 1), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["level"], "ERROR");
    assert!(v["message"].as_str().unwrap().contains("single tensor, not a tuple"), "{v}");
    // A target class the model does not have: named with the job file's line, as a spec error.
    let job5 = write_job(&ds.dir, &model, "");
    std::fs::write(&job5, std::fs::read_to_string(&job5).unwrap().replace("target = \"label\"", "target = 5")).unwrap();
    let out = Command::new(bin()).arg("validate").arg(&job5).output().unwrap();
    let err5 = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err5}");
    assert!(err5.contains("line 11: attribution.target: ") && err5.contains("5 is not a class of the model"), "{err5}");

    // An output store that cannot be reached (nothing listens on the port): exit 3, retried by
    // the cluster manifests, where a bad spec is 2.
    let job = write_job(&ds.dir, &model, "");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(bin())
        .args(["-q", "run"])
        .arg(&job)
        .args(["--output", "s3://audit/out"])
        .envs([
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("s3://audit/out") && err.contains("a retry may pass it"), "{err}");

    // A process given a GPU that libtorch cannot see (a driver too old for CUDA 13) stops with
    // exit 3, which a scheduler retries (elsewhere), instead of running on the CPU. Checkable
    // only where there is no CUDA device, as on CI.
    if !tch::Cuda::is_available() {
        let job = write_job(&ds.dir, &model, "");
        let text =
            std::fs::read_to_string(&job).unwrap().replacen("batch_size = 16", "batch_size = 16\ndevices = \"all\"", 1);
        std::fs::write(&job, text).unwrap();
        let out = Command::new(bin()).arg("run").arg(&job).env("CUDA_VISIBLE_DEVICES", "0").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(err.contains("CUDA_VISIBLE_DEVICES is \"0\"") && err.contains("runtime.devices = [\"cpu\"]"), "{err}");
        assert!(!ds.dir.join("out").exists(), "no work");
    }
}

/// `n` good images (and the planted bad ones) with a job that runs ResNet-18 at 112×112 in
/// batches of 4 and parts of 20 rows: slow enough on a CPU to be interrupted part-way.
fn slow_job(root: &Path, n: usize) -> (Dataset, PathBuf) {
    let ds = make_dataset(root, n);
    let job = write_job(&ds.dir, &engine_cases().join("resnet18_layer4/model.pt"), "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("[preprocess]\n", "[preprocess]\nresize = 112\ncrop = 112\n")
        .replace("target = \"label\"", "target = \"predicted\"")
        .replace("batch_size = 16", "batch_size = 4")
        .replace("rows_per_part = 50", "rows_per_part = 20");
    std::fs::write(&job, text).unwrap();
    (ds, job)
}

/// Names of the committed parts in `dir` (none when it does not exist yet).
fn part_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .filter(|n| n.starts_with("part-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `child`'s run has committed its first part into `dir`, while it still runs.
fn wait_for_first_part(child: &mut std::process::Child, dir: &Path) {
    let start = std::time::Instant::now();
    while part_names(dir).is_empty() {
        assert!(start.elapsed().as_secs() < 120, "no part committed in 2 minutes");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Spawns `cmd` with its stderr read on a thread, which sends on the receiver each time a line
/// contains `marker` and returns the whole text when the process ends.
fn spawn_watching(
    cmd: &mut Command,
    marker: &'static str,
) -> (std::process::Child, std::sync::mpsc::Receiver<()>, std::thread::JoinHandle<String>) {
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains(marker) {
                let _ = seen_tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    (child, seen_rx, reader)
}

/// Stops a run once its first part is committed (SIGINT and SIGTERM, as Kubernetes and Slurm
/// send it: graceful; SIGKILL: at any moment),
/// while a second run of the same command, started meanwhile, waits for the shard's lock; the
/// second then resumes: every sample ends up exactly once, and nothing half-written is taken
/// as complete.
fn interrupt_and_resume(signal: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, job) = slow_job(tmp.path(), 600);
    let out_dir = ds.dir.join("out");
    let parts = || part_names(&out_dir);
    let mut child = Command::new(bin()).arg("-q").arg("run").arg(&job).spawn().unwrap();
    wait_for_first_part(&mut child, &out_dir);
    // Frozen, the first run holds its shard's lock: a second run of the same job (a requeued
    // task, say) must wait for it rather than write the same files.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    // A run of the job whose stderr is read on a thread; the receiver hears when it waits.
    let waiting_run =
        || spawn_watching(Command::new(bin()).arg("run").arg(&job), "is being written by another process");
    let (mut again, waiting_rx, reader) = waiting_run();
    let waited = waiting_rx.recv_timeout(std::time::Duration::from_secs(120));
    let committed = parts().len();
    if signal == libc::SIGINT && waited.is_ok() {
        // One Ctrl-C stops a run that waits for the lock, at once and without writing.
        let (mut third, third_waiting, third_reader) = waiting_run();
        let third_waited = third_waiting.recv_timeout(std::time::Duration::from_secs(120));
        unsafe { libc::kill(third.id() as i32, libc::SIGINT) };
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(status) = third.try_wait().unwrap() {
                break Some(status);
            }
            if t.elapsed().as_secs() >= 30 {
                third.kill().unwrap();
                third.wait().unwrap();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let err = third_reader.join().unwrap();
        assert!(third_waited.is_ok(), "the third run did not wait: {err}");
        let status = status.unwrap_or_else(|| panic!("Ctrl-C did not stop a waiting run within 30 s: {err}"));
        assert_eq!(status.code(), Some(130), "{err}");
        assert!(err.contains("interrupted while waiting for the lock"), "{err}");
        assert!(!out_dir.join("_run-00000-of-00001.json").exists(), "the waiting run wrote a summary");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The first run is frozen: only the second could have written meanwhile.
    let unchanged = parts().len() == committed;
    let complete = out_dir.join("_SUCCESS").exists();
    unsafe { libc::kill(child.id() as i32, signal) };
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    let status = child.wait().unwrap();
    assert!(waited.is_ok(), "the second run did not wait for the first");
    assert!(unchanged, "the second run wrote while the first held the shard");
    assert!(!complete, "an interrupted run is not complete");
    let total_parts = ds.expected.len().div_ceil(20);
    assert!(committed < total_parts, "the run finished before the signal ({committed} parts)");
    if signal != libc::SIGKILL {
        assert_eq!(status.code(), Some(130), "Ctrl-C and SIGTERM exit 130");
    } else {
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    }
    // The second run takes over once the first is gone and finishes the job.
    let again_status = again.wait().unwrap();
    let again_err = reader.join().unwrap();
    assert_eq!(again_status.code(), Some(1), "{again_err}");
    let rows = read_all(&out_dir);
    assert_eq!(rows.num_rows(), ds.expected.len(), "every sample exactly once");
    let index = col::<UInt64Array>(&rows, "index");
    assert!((0..rows.num_rows()).all(|i| index.value(i) == i as u64), "indices 0..n, each once");
    assert_eq!(parts().len(), total_parts);
    assert!(out_dir.join("_SUCCESS").exists());
    let leftovers: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// A second Ctrl-C quits at once with 130 (it crashed in libtorch's exit handlers before), and
/// a rerun finishes the job with every sample once.
#[test]
fn a_second_ctrl_c_quits_with_130() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, job) = slow_job(tmp.path(), 400);
    let out_dir = ds.dir.join("out");
    // The second signal goes as soon as the first is acknowledged, while the batches in flight
    // are still being finished (several, at a fraction of a second each on a CPU).
    let (mut child, said_rx, reader) =
        spawn_watching(Command::new(bin()).arg("-q").arg("run").arg(&job), "interrupted: stopping");
    wait_for_first_part(&mut child, &out_dir);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    said_rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the first Ctrl-C is acknowledged");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}: {err}");
    assert!(err.contains("interrupted again"), "{err}");
    let again = Command::new(bin()).arg("-q").arg("run").arg(&job).output().unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(read_all(&out_dir).num_rows(), ds.expected.len(), "every sample exactly once");
}

#[test]
fn ctrl_c_commits_complete_parts_and_a_rerun_finishes() {
    interrupt_and_resume(libc::SIGINT);
}

#[test]
fn sigterm_commits_complete_parts_and_a_rerun_finishes() {
    interrupt_and_resume(libc::SIGTERM);
}

#[test]
fn sigkill_at_any_moment_then_rerun_gives_every_sample_once() {
    interrupt_and_resume(libc::SIGKILL);
}

/// Three shards (one by arguments, two from a Kubernetes and a Slurm environment) write into
/// one folder; `finalize` checks them and writes `_SUCCESS` (`run --finalize`: the last shard to
/// finish does); their union equals the unsharded run, with no overlap. JSON log lines come out
/// with `--log-format json`; `--failed-samples-ok` exits 0 where failed samples would give 1.
#[test]
fn shards_union_equals_the_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 60);
    let model = engine_cases().join("pipeline/model.pt");
    let job = write_job(&ds.dir, &model, "");
    let whole = ds.dir.join("whole");
    let sharded = ds.dir.join("sharded");
    let st = Command::new(bin()).args(["-q", "run"]).arg(&job).arg("--output").arg(&whole).status().unwrap();
    assert_eq!(st.code(), Some(1));
    // (environment, arguments) per shard
    type ShardRun<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let runs: [ShardRun; 3] = [
        (&[], &["--shard-index", "0", "--num-shards", "3"]),
        (&[("JOB_COMPLETION_INDEX", "1"), ("NUM_SHARDS", "3")], &[]),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("SLURM_ARRAY_TASK_MAX", "2"),
                ("NUM_SHARDS", "3"),
            ],
            &[],
        ),
    ];
    for (i, (env, args)) in runs.iter().enumerate() {
        if i == 2 {
            // Not every shard is done yet: finalize names the missing one.
            let f = Command::new(bin()).arg("finalize").arg(&sharded).output().unwrap();
            assert_eq!(f.status.code(), Some(2));
            let err = String::from_utf8_lossy(&f.stderr);
            assert!(err.contains("shard(s) 2 of 3"), "{err}");
        }
        let mut c = Command::new(bin());
        c.args(["--log-format", "json", "run"]).arg(&job).arg("--output").arg(&sharded).args(*args);
        if i > 0 {
            // As the cluster manifests run it: the shard exits 0 although samples failed, and
            // the last shard to finish writes _SUCCESS.
            c.args(["--failed-samples-ok", "--finalize"]);
        }
        for (k, v) in *env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        match i {
            0 => assert_eq!(out.status.code(), Some(1), "shard 0: {}", String::from_utf8_lossy(&out.stderr)),
            _ => assert_eq!(out.status.code(), Some(0), "shard {i}: {}", String::from_utf8_lossy(&out.stderr)),
        }
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("sample(s) failed"),
            "shard {i}: the failures are reported"
        );
        // Every line on stderr is a JSON object: log lines, and the command's own messages
        // (the run's summary, finalize's outcome, the count of failed samples); nothing is
        // left on stdout.
        assert_eq!(stdout, "", "shard {i}");
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let messages: Vec<&str> = lines.iter().map(|v| v["message"].as_str().unwrap_or_default()).collect();
        assert!(messages.iter().any(|m| m.contains("samples processed in")), "{messages:?}");
        if i == 1 {
            assert!(messages.iter().any(|m| m.contains("not finalized yet: shard(s) 2 of 3 still to finish")));
        }
        assert_eq!(sharded.join("_SUCCESS").exists(), i == 2, "after shard {i}: {messages:?}");
        if i == 2 {
            assert!(messages.iter().any(|m| m.starts_with("finalized") && m.contains("all 3 shards complete")));
        }
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines
            .iter()
            .any(|v| v["level"] == "ERROR" && v["message"].as_str().unwrap().contains("sample(s) failed")));
        assert!(ds.dir.join(format!("sharded/_run-0000{i}-of-00003.json")).exists());
    }
    let f = Command::new(bin()).arg("finalize").arg(&sharded).output().unwrap();
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stderr));
    let success: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join("_SUCCESS")).unwrap()).unwrap();
    assert_eq!(success["rows"], ds.expected.len());
    assert_eq!(success["num_shards"], 3);

    assert_eq!(rows_by_id(&whole).len(), ds.expected.len());
    assert_outputs_agree(&whole, &sharded, "the shards' union against the unsharded run", &[]);
}

/// `bench`: synthetic input per device and for 1..N devices together (two CPU replicas here),
/// and `--job` runs the whole pipeline per device count into a temporary folder.
#[test]
fn bench_command_reports_scaling_and_real_data() {
    let model = engine_cases().join("pipeline/model.pt");
    let out = Command::new(bin())
        .args(["-q", "bench", "--model"])
        .arg(&model)
        .args(["--devices", "cpu,cpu", "--iters", "3", "--warmup", "1", "--batch-size", "4", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["single"].as_array().unwrap().len(), 2);
    assert_eq!(v["single"][0]["device"], "cpu", "devices named as jobs and flags name them");
    let scaling = v["scaling"].as_array().unwrap();
    assert_eq!(scaling[1]["devices"], serde_json::json!(["cpu", "cpu"]));
    assert_eq!(scaling.len(), 2);
    assert_eq!(scaling[1]["devices"].as_array().unwrap().len(), 2);
    assert!(scaling[1]["images_per_s"].as_f64().unwrap() > 0.0);
    assert!((scaling[0]["efficiency"].as_f64().unwrap() - 1.0).abs() < 1e-9);

    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 20);
    let job = write_job(&ds.dir, &model, "");
    let out = Command::new(bin())
        .args(["-q", "bench", "--job"])
        .arg(&job)
        .args(["--devices", "cpu", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["summary"]["processed"], 29);
    assert!(v[0]["summary"]["stage_busy_s"]["engine"].as_f64().unwrap() > 0.0);
    assert!(!ds.dir.join("out").exists(), "bench writes into a temporary folder, not the job's output");
    // Without --devices, the job's own devices (one row); the engine's settings are the job's.
    let out = Command::new(bin()).args(["-q", "bench", "--job"]).arg(&job).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["devices"], serde_json::json!(["cpu"]));
    assert_eq!(v[0]["summary"]["batch_size"], 16, "the job's batch size");
    let out = Command::new(bin())
        .args(["-q", "bench", "--job"])
        .arg(&job)
        .args(["--batch-size", "4", "--precision", "bf16", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--model, --batch-size") && err.contains("--precision") && err.contains("runtime.batch_size"),
        "{err}"
    );
}

/// Two workers on one device (two model replicas pulling from one queue) and
/// `batch_size = "auto"` (32 without a CUDA device) give the same rows as one worker with
/// batches of 16, and the run summary says which batch size and how many workers ran.
#[test]
fn two_workers_per_device_and_auto_batch_size() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 60);
    let model = engine_cases().join("pipeline/model.pt");
    let job = write_job(&ds.dir, &model, "");
    let text = std::fs::read_to_string(&job).unwrap();
    let two = ds.dir.join("two.toml");
    std::fs::write(&two, text.replace("batch_size = 16", "batch_size = \"auto\"\nworkers_per_device = 2")).unwrap();
    let (one_out, two_out) = (ds.dir.join("one"), ds.dir.join("two"));
    for (j, out) in [(&job, &one_out), (&two, &two_out)] {
        let st = Command::new(bin()).args(["-q", "run"]).arg(j).arg("--output").arg(out).status().unwrap();
        assert_eq!(st.code(), Some(1), "{}: some samples of the dataset are bad on purpose", j.display());
    }
    let summary = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("_run-00000-of-00001.json")).unwrap()).unwrap()
    };
    let (s1, s2) = (summary(&one_out), summary(&two_out));
    assert_eq!((s1["batch_size"].as_u64(), s1["workers"].as_u64()), (Some(16), Some(1)));
    assert_eq!((s2["batch_size"].as_u64(), s2["workers"].as_u64()), (Some(32), Some(2)));
    assert_eq!(s1["processed"], s2["processed"]);
    let (a, b) = (read_all(&one_out), read_all(&two_out));
    // One row per sample in each output: no id twice (two workers share the writer), none lost.
    assert_eq!((a.num_rows(), b.num_rows()), (ds.expected.len(), ds.expected.len()));
    let by_id = |batch: &RecordBatch| -> BTreeMap<String, (String, Option<f32>)> {
        let (ids, st) = (col::<StringArray>(batch, "id"), col::<StringArray>(batch, "status"));
        let total = col::<Float32Array>(batch, "attr_total");
        let mut m = BTreeMap::new();
        for i in 0..batch.num_rows() {
            let row = (st.value(i).to_owned(), total.is_valid(i).then(|| total.value(i)));
            assert!(m.insert(ids.value(i).to_owned(), row).is_none(), "{} twice", ids.value(i));
        }
        m
    };
    let (a, b) = (by_id(&a), by_id(&b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut compared = 0;
    for (id, (st, total)) in &a {
        let (st2, total2) = &b[id];
        assert_eq!(st, st2, "{id}");
        if let (Some(x), Some(y)) = (total, total2) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-12), "{id}: attr_total {x} vs {y}");
            compared += 1;
        }
    }
    assert!(compared >= 40, "only {compared} ok rows compared");
}

/// A model with one input channel runs on the images' luminance: every sample gets its
/// expected row, and each good one the attribution Captum gives on torchvision's `Grayscale`
/// of PIL's image.
#[test]
fn a_one_channel_model_runs_on_luminance() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 12);
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model_gray.pt"), "");
    let out = Command::new(bin()).args(["-q", "run"]).arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "some samples are bad on purpose\n{stderr}");
    let rows = read_all(&ds.dir.join("out"));
    let (ids, status) = (col::<StringArray>(&rows, "id"), col::<StringArray>(&rows, "status"));
    assert_eq!(rows.num_rows(), ds.expected.len());
    for i in 0..rows.num_rows() {
        assert_eq!(status.value(i), ds.expected[ids.value(i)].as_str(), "{}", ids.value(i));
    }

    let clean = tmp.path().join("clean");
    clean_dataset(&clean);
    let cases = engine_cases().join("pipeline");
    let reference = captum_reference(&clean, &cases.join("model_gray_eager.pth"), true);
    let job = write_job(&clean, &cases.join("model_gray.pt"), "");
    let o = Command::new(bin()).args(["-q", "run"]).arg(&job).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_all(&clean.join("out"));
    assert_eq!(rows.num_rows(), 12);
    let ids = col::<StringArray>(&rows, "id");
    for i in 0..rows.num_rows() {
        let want = &reference[ids.value(i)];
        for (k, tol) in [("target_prob", 1e-5), ("attr_total", 1e-4), ("attr_max", 1e-4)] {
            let got = col::<Float32Array>(&rows, k).value(i) as f64;
            let w = want[k].as_f64().unwrap();
            let scale = if k == "target_prob" { 1.0 } else { w.abs().max(1e-12) };
            assert!((got - w).abs() <= tol * scale, "{}: {k} {got} vs Captum's {w}", ids.value(i));
        }
    }
}

/// `runtime.stats_on_device = true` (statistics and map resize in libtorch, where the maps are;
/// the default on CUDA) gives the rows the host computes (`false`, the default on the CPU):
/// every statistic within float rounding, every map within one quantisation level, with boxes,
/// regions and failed samples in the run.
#[test]
fn statistics_on_the_device_equal_the_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 48);
    let model = engine_cases().join("pipeline/model.pt");
    let regions = "\n[[regions]]\nname = \"corner\"\nx0 = 0.6\ny0 = 0.0\nx1 = 1.0\ny1 = 0.3\n\
                   [[regions]]\nname = \"sliver\"\nx0 = 0.5\ny0 = 0.5\nx1 = 0.5001\ny1 = 0.9\n";
    let job = write_job(&ds.dir, &model, regions);
    let text = std::fs::read_to_string(&job).unwrap();
    let (host_out, dev_out) = (ds.dir.join("host"), ds.dir.join("device"));
    for (flag, out) in [("false", &host_out), ("true", &dev_out)] {
        let j = ds.dir.join(format!("stats-{flag}.toml"));
        std::fs::write(&j, text.replace("batch_size = 16", &format!("batch_size = 16\nstats_on_device = {flag}")))
            .unwrap();
        let st = Command::new(bin()).args(["-q", "run"]).arg(&j).arg("--output").arg(out).status().unwrap();
        assert_eq!(st.code(), Some(1), "{}: some samples of the dataset are bad on purpose", j.display());
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("_run-00000-of-00001.json")).unwrap()).unwrap();
        assert_eq!(summary["workers_with_stats_on_device"], u64::from(flag == "true"), "{flag}");
    }
    let (a, b) = (read_all(&host_out), read_all(&dev_out));
    assert_eq!(a.num_rows(), b.num_rows());
    let order = |batch: &RecordBatch| -> Vec<usize> {
        let ids = col::<StringArray>(batch, "id");
        let mut idx: Vec<usize> = (0..batch.num_rows()).collect();
        idx.sort_by_key(|&i| ids.value(i).to_owned());
        idx
    };
    let (ia, ib) = (order(&a), order(&b));
    let stat_cols: Vec<String> = a
        .schema()
        .fields()
        .iter()
        .filter(|f| f.data_type() == &arrow::datatypes::DataType::Float32)
        .map(|f| f.name().clone())
        .collect();
    assert!(stat_cols.iter().any(|c| c == "region_corner_share") && stat_cols.iter().any(|c| c == "attr_gini"));
    let (mut ok_rows, mut boxes) = (0, 0);
    for (&i, &j) in ia.iter().zip(&ib) {
        let id = col::<StringArray>(&a, "id").value(i);
        assert_eq!(id, col::<StringArray>(&b, "id").value(j));
        assert_eq!(col::<StringArray>(&a, "status").value(i), col::<StringArray>(&b, "status").value(j), "{id}");
        for name in &stat_cols {
            let (x, y) = (col::<Float32Array>(&a, name), col::<Float32Array>(&b, name));
            assert_eq!(x.is_valid(i), y.is_valid(j), "{id} {name}: null on one side only");
            if x.is_valid(i) {
                let (x, y) = (x.value(i), y.value(j));
                // Magnitudes (about 1e-7..1e-3 on this model) are compared relatively, shares,
                // coordinates and entropies (order one) absolutely.
                let magnitude = ["attr_total", "attr_max", "cam_max", "map_scale"].contains(&name.as_str());
                let tol = if magnitude { 1e-5 * x.abs() + 1e-12 } else { 1e-5 * x.abs().max(1.0) };
                assert!((x - y).abs() <= tol, "{id} {name}: host {x} vs device {y}");
            }
        }
        let (pa, pb) = (col::<BinaryArray>(&a, "map_png"), col::<BinaryArray>(&b, "map_png"));
        if pa.is_valid(i) {
            ok_rows += 1;
            boxes += usize::from(col::<Float32Array>(&a, "bbox_mass_share").is_valid(i));
            let scale = |batch: &RecordBatch, k: usize| col::<Float32Array>(batch, "map_scale").value(k);
            let (ma, _, _) = stats::decode_map_png(pa.value(i), scale(&a, i)).unwrap();
            let (mb, _, _) = stats::decode_map_png(pb.value(j), scale(&b, j)).unwrap();
            let level = scale(&a, i) / 255.0;
            for (p, (u, v)) in ma.iter().zip(&mb).enumerate() {
                assert!((u - v).abs() <= 1.01 * level + 1e-6, "{id} map pixel {p}: {u} vs {v}");
            }
        }
    }
    assert!(ok_rows >= 40 && boxes >= 10, "{ok_rows} ok rows, {boxes} with a box");
}

/// A libtorch failure inside a batch (here: the map resize cannot allocate its output, as a
/// batch that runs out of device memory would fail) is that batch's error, not a crash, and the
/// replica keeps working afterwards.
#[test]
fn a_libtorch_failure_is_the_batchs_error() {
    use saliency_audit::engine::batch::TorchAttributor;
    use saliency_audit::engine::reduce::Reduction;
    let model = engine_cases().join("pipeline/model.pt");
    let mut a = TorchAttributor::load(&model, Device::Cpu, EngineOptions::default(), &[0.5; 3], &[0.25; 3]).unwrap();
    let (n, h, w) = (2, 32, 32);
    let data = (0..n * h * w * 3).map(|i| (i % 251) as u8).collect();
    let batch = U8Batch { n, h, w, data, targets: vec![Some(0), Some(1)], ..U8Batch::default() };
    // 2 × 2^18 × 2^18 float32 maps: 2 TiB.
    a.set_reduction(Some(Reduction { map_size: 1 << 18, regions: Vec::new() }));
    let err = a.attribute(&batch).unwrap_err();
    // The pipeline takes it for running out of memory: later batches go smaller.
    assert!(pipeline::is_out_of_memory(&err), "{err:#}");
    let err = format!("{err:#}");
    // libtorch's own message, without tch's wrapping or the C++ frames.
    assert!(err.starts_with("libtorch: ") && err.contains("allocate"), "{err}");
    assert!(!err.contains("frame #") && !err.contains("unwrap") && err.lines().count() == 1, "{err}");
    a.set_reduction(Some(Reduction { map_size: 8, regions: Vec::new() }));
    let maps = a.attribute(&batch).unwrap();
    assert_eq!(maps.len(), 2);
    assert!(matches!(&maps[0].map, MapOut::Reduced { resized, .. } if resized.len() == 64));
    // The start-up trial with an object box and a mask per image (as a job with boxes and
    // masks warms up) goes through the device statistics' box and mask sums.
    a.warm_up(3, h, w, true, true).unwrap();
    assert!(!pipeline::is_out_of_memory(&anyhow::anyhow!("this image breaks the model")));
}

/// `target = "label"` over a manifest without labels is the job's error (exit 2, before any
/// work), not a `bad_label` row for every sample.
#[test]
fn target_label_without_labels_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 6);
    let csv = ds.dir.join("samples.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let paths: Vec<&str> =
        text.lines().skip(1).filter(|l| l.starts_with("img/")).map(|l| l.split(',').next().unwrap()).collect();
    std::fs::write(&csv, format!("path\n{}\n", paths.join("\n"))).unwrap();
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    for cmd in ["validate", "run"] {
        let o = Command::new(bin()).arg(cmd).arg(&job).output().unwrap();
        let msg = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {msg}");
        assert!(
            msg.contains("attribution.target") && msg.contains("samples.csv") && msg.contains("no sample"),
            "{msg}"
        );
    }
    assert!(!ds.dir.join("out").exists(), "nothing written");
}

/// A manifest row whose object box cannot be used is that sample's `bad_box` row; the job runs.
#[test]
fn a_bad_box_is_the_samples_row() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 6);
    let csv = ds.dir.join("samples.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("img/0001.png,square,x_box,9,3,4,20,\n");
    std::fs::write(&csv, text).unwrap();
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    let v = Command::new(bin()).arg("validate").arg(&job).output().unwrap();
    let plan = String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success() && plan.contains("1 with a bad box"), "{plan}");
    let o = Command::new(bin()).arg("-q").arg("run").arg(&job).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_all(&ds.dir.join("out"));
    let (ids, st, err) =
        (col::<StringArray>(&rows, "id"), col::<StringArray>(&rows, "status"), col::<StringArray>(&rows, "error"));
    let i = (0..rows.num_rows()).find(|&i| ids.value(i) == "x_box").unwrap();
    assert_eq!(st.value(i), "bad_box");
    assert!(err.value(i).contains("samples.csv line") && err.value(i).contains("is empty"), "{}", err.value(i));
    assert_eq!(rows.num_rows(), ds.expected.len() + 1);
    assert_eq!((0..rows.num_rows()).filter(|&i| st.value(i) == "ok").count(), 6);

    // The same job named another way (from its folder, through `.`, through a link) is the
    // same job: the rerun keeps every row, although the box error quotes the manifest's path and
    // a mask is keyed by its location.
    let name = job.file_name().unwrap();
    std::os::unix::fs::symlink(&ds.dir, tmp.path().join("link")).unwrap();
    for (cwd, arg) in [
        (ds.dir.clone(), PathBuf::from(name)),
        (tmp.path().to_path_buf(), ds.dir.join(".").join(name)),
        (tmp.path().to_path_buf(), PathBuf::from("link").join(name)),
    ] {
        let o = Command::new(bin()).current_dir(&cwd).arg("run").arg(&arg).output().unwrap();
        let said = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{arg:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(said.contains("0 of 0 samples processed") && said.contains("kept from an earlier run"), "{said}");
    }
    // And moved elsewhere, output folder and all (or mounted at another path on another node).
    let moved = tempfile::tempdir().unwrap();
    let st = Command::new("cp").arg("-a").arg(&ds.dir).arg(moved.path().join("ds")).status().unwrap();
    assert!(st.success());
    let o = Command::new(bin()).arg("run").arg(moved.path().join("ds").join(name)).output().unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "moved: {}", String::from_utf8_lossy(&o.stderr));
    assert!(said.contains("0 of 0 samples processed") && said.contains("kept from an earlier run"), "{said}");
}

/// A CUDA device named in the job that the machine does not have is the job's error, naming
/// the key and its line.
#[test]
fn a_cuda_device_that_is_not_there_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(tmp.path(), 3);
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    let text = std::fs::read_to_string(&job).unwrap();
    let with_devices = |d: &str| text.replace("batch_size = 16", &format!("batch_size = 16\ndevices = [\"{d}\"]"));
    // No machine has 100 GPUs.
    std::fs::write(&job, with_devices("cuda:99")).unwrap();
    let o = Command::new(bin()).arg("validate").arg(&job).env_remove("CUDA_VISIBLE_DEVICES").output().unwrap();
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains("job.toml line") && msg.contains("runtime.devices"), "{msg}");
    assert!(msg.contains("\"cuda:99\" is not available"), "{msg}");
    assert_eq!(o.status.code(), Some(2), "{msg}");
    if tch::Cuda::is_available() {
        return; // the rest is about a machine without a usable GPU
    }
    std::fs::write(&job, with_devices("cuda:0")).unwrap();
    // On a node that was given a GPU it cannot use (a driver fault), the run failed, and a retry
    // elsewhere may get past it (exit 3), as with devices = "all".
    let o = Command::new(bin()).arg("validate").arg(&job).env("CUDA_VISIBLE_DEVICES", "0").output().unwrap();
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains("\"cuda:0\" is not available") && msg.contains("CUDA_VISIBLE_DEVICES is \"0\""), "{msg}");
    assert_eq!(o.status.code(), Some(3), "{msg}");
}

/// An image folder of the model's class names with a stray folder, a file that is not an image
/// and a broken link named like one: the classes keep the model's ids, the stray folder's
/// images have no label (`bad_label` rows with the label as the target, attributed with the
/// predicted class), the file left out is said, and the link is a `missing` row.
#[test]
fn an_image_folder_with_a_stray_folder_and_a_text_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    for (i, rel) in ["square/a.png", "triangle/b.png", "unsorted/c.png"].iter().enumerate() {
        std::fs::create_dir_all(root.join(rel).parent().unwrap()).unwrap();
        pattern(40, 40, i as u32).save(root.join(rel)).unwrap();
    }
    std::fs::write(root.join("square/notes.txt"), "not an image").unwrap();
    std::os::unix::fs::symlink(root.join("nowhere.jpg"), root.join("square/broken.jpg")).unwrap();
    let job = write_job(tmp.path(), &engine_cases().join("pipeline/model.pt"), "");
    let text = std::fs::read_to_string(&job).unwrap().replace("manifest = \"samples.csv\"", "image_folder = \"train\"");
    std::fs::write(&job, text).unwrap();
    let v = Command::new(bin()).arg("validate").arg(&job).output().unwrap();
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(
        err.contains(
            "1 file(s) in the class folders are not images by their names and are left out (square/notes.txt)"
        ),
        "{err}"
    );
    assert!(err.contains("class folder(s) unsorted are not among the model's class names"), "{err}");
    assert!(err.contains("have no label (bad_label rows where the target is the label)"), "{err}");
    let plan = String::from_utf8_lossy(&v.stdout);
    assert!(plan.contains("(4 samples, 3 labelled, 1 with a bad label, 0 with a bad box)"), "{plan}");
    let o = Command::new(bin()).args(["-q", "run"]).arg(&job).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_all(&tmp.path().join("out"));
    let (ids, label, status, error) = (
        col::<StringArray>(&rows, "id"),
        col::<Int64Array>(&rows, "label"),
        col::<StringArray>(&rows, "status"),
        col::<StringArray>(&rows, "error"),
    );
    let got: Vec<(&str, Option<i64>, &str)> = (0..rows.num_rows())
        .map(|i| (ids.value(i), label.is_valid(i).then(|| label.value(i)), status.value(i)))
        .collect();
    assert_eq!(
        got,
        [
            ("square/a.png", Some(1), "ok"),
            ("square/broken.jpg", Some(1), "missing"),
            ("triangle/b.png", Some(2), "ok"),
            ("unsorted/c.png", None, "bad_label")
        ]
    );
    assert!(error.value(1).contains("broken.jpg"), "{}", error.value(1));
    assert!(
        error.value(3).contains("unsorted/c.png: no label, and the job's target is \"label\""),
        "{}",
        error.value(3)
    );
    // With the predicted class as the target, the stray folder's image is attributed.
    let text = std::fs::read_to_string(&job).unwrap().replace("target = \"label\"", "target = \"predicted\"");
    std::fs::write(&job, text).unwrap();
    let o = Command::new(bin())
        .args(["-q", "run"])
        .arg(&job)
        .arg("--output")
        .arg(tmp.path().join("predicted"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_all(&tmp.path().join("predicted"));
    let status = col::<StringArray>(&rows, "status");
    let statuses: Vec<&str> = (0..rows.num_rows()).map(|i| status.value(i)).collect();
    assert_eq!(statuses, ["ok", "missing", "ok", "ok"]);
}

/// `scripts/captum_reference.py --model … --compare OUT`: a run on a user's own model (a
/// torchvision ResNet-18 exported without batch norm folded) checked against Captum on the
/// eager model, statistic by statistic (exit 0); a run of another model's weights fails the
/// check (exit 1, the statistics over their tolerance marked).
#[test]
fn captum_reference_checks_a_run_on_a_users_own_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut lines = vec!["path,label,id,bbox_x0,bbox_y0,bbox_x1,bbox_y1,mask".to_owned()];
    for i in 0..4u32 {
        pattern(70 + 7 * i, 90, 300 + i).save(dir.join(format!("im{i}.png"))).unwrap();
        let bbox = if i % 2 == 0 { "10.3,8.7,60.2,50.1" } else { ",,," };
        lines.push(format!("im{i}.png,{},s{i},{bbox},", i % 4));
    }
    std::fs::write(dir.join("m.csv"), lines.join("\n") + "\n").unwrap();
    let py = |args: &[&str]| {
        let o = Command::new(crate::common::python())
            .args(args)
            .current_dir(dir)
            .env("PYTHONWARNINGS", "ignore")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let script = |name: &str| crate::common::repo().join("scripts").join(name).to_string_lossy().into_owned();
    for (seed, weights) in [(0, "w.pth"), (1, "other.pth")] {
        let save = format!(
            "import torch, torchvision; torch.manual_seed({seed}); \
             torch.save(torchvision.models.resnet18(weights=None, num_classes=4).state_dict(), '{weights}')"
        );
        assert_eq!(py(&["-c", &save]).0, Some(0));
        let model = weights.replace(".pth", ".pt");
        let export = py(&[
            &script("export_model.py"),
            "--arch",
            "resnet18",
            "--num-classes",
            "4",
            "--weights",
            weights,
            "--layer",
            "layer4",
            "--input-size",
            "64",
            "64",
            "--resize",
            "72",
            "--no-fold-batchnorm",
            "--out",
            &model,
        ]);
        assert_eq!(export.0, Some(0), "{}", export.2);
        let job = format!(
            "[dataset]\nmanifest = \"m.csv\"\n[model]\npath = \"{model}\"\n[runtime]\ndevices = [\"cpu\"]\n\
             [output]\npath = \"out-{seed}\"\nmap_size = 16\n[[regions]]\nname = \"corner\"\nx0 = 0.0\ny0 = 0.0\nx1 = 0.3\ny1 = 0.3\n"
        );
        std::fs::write(dir.join("job.toml"), job).unwrap();
        let o = Command::new(bin()).args(["-q", "run", "job.toml"]).current_dir(dir).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let check = |out: &str| {
        py(&[
            &script("captum_reference.py"),
            "m.csv",
            "w.pth",
            "ref.json",
            "--model",
            "w.pt",
            "--arch",
            "resnet18",
            "--num-classes",
            "4",
            "--region",
            "corner:0.0,0.0,0.3,0.3",
            "--compare",
            out,
        ])
    };
    let (code, said, err) = check("out-0");
    assert_eq!(code, Some(0), "{said}\n{err}");
    for k in ["attr_total", "attr_gini", "bbox_mass_share", "region_corner_share", "cam_max", "target_prob"] {
        assert!(said.lines().any(|l| l.starts_with(k) && !l.contains("OVER")), "{k}: {said}");
    }
    let (code, said, _) = check("out-1");
    assert_eq!(code, Some(1), "another model's run passes the check: {said}");
    assert!(said.contains("OVER"), "{said}");
}
