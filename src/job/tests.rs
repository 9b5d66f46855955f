use std::path::{Path, PathBuf};

use crate::engine::ModelMeta;
use crate::store::Loc;

use super::*;

/// A full valid spec; line numbers below refer to it.
const FULL: &str = r#"[dataset]
manifest = "samples.csv"
[model]
path = "model.pt"
[preprocess]
resize = 256
crop = 224
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
max_pixels = 1000000
[runtime]
batch_size = 16
devices = ["cuda:0", "cuda:1"]
decode_threads = 4
[attribution]
target = "predicted"
interpolate_mode = "bilinear"
guided_rectifiers = ["relu", "relu6"]
precision = "bf16"
[output]
path = "out/"
map_size = 32
rows_per_part = 100
[[regions]]
name = "top_right"
x0 = 0.75
y0 = 0.0
x1 = 1.0
y1 = 0.25
[[regions]]
name = "centre"
x0 = 0.25
y0 = 0.25
x1 = 0.75
y1 = 0.75
"#;

const MINIMAL: &str = "[dataset]\nimage_folder = \"train\"\n[model]\npath = \"m.pt\"\n[output]\npath = \"out\"\n";

fn parse(text: &str) -> Result<JobSpec, JobError> {
    parse_spec(text, Path::new("job.toml"))
}

/// Replaces the first line starting with `key =` in FULL by `line`.
fn full_with(key: &str, line: &str) -> String {
    let mut done = false;
    FULL.lines()
        .map(|l| {
            if !done && l.starts_with(&format!("{key} =")) {
                done = true;
                line.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[track_caller]
fn assert_err(text: &str, key: &str, line: usize) -> JobError {
    let err = parse(text).expect_err("spec should be rejected");
    let msg = err.to_string();
    assert!(msg.contains(key), "message {msg:?} does not name {key}");
    assert!(msg.contains(&format!("line {line}:")), "message {msg:?} does not name line {line}");
    assert!(msg.starts_with("job.toml"), "message {msg:?} does not name the file");
    err
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("samples.csv"), "path\na.jpg\n").unwrap();
        std::fs::write(dir.path().join("model.pt"), b"not a zip").unwrap();
        std::fs::write(dir.path().join("m.pt"), b"not a zip").unwrap();
        std::fs::create_dir(dir.path().join("train")).unwrap();
        Dir { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

#[test]
fn full_spec_resolves() {
    let d = Dir::new();
    let job = resolve(parse(FULL).unwrap(), d.path(), None).unwrap();
    assert_eq!(job.dataset, DatasetSource::Manifest(Loc::from(d.path().join("samples.csv"))));
    assert_eq!(job.model, d.path().join("model.pt"));
    assert_eq!(job.preprocess.resize, Resize::ShorterSide(256));
    assert_eq!(job.preprocess.crop, Some((224, 224)));
    assert_eq!(job.preprocess.mean, vec![0.485, 0.456, 0.406]);
    assert_eq!(job.preprocess.std, vec![0.229, 0.224, 0.225]);
    assert_eq!(job.preprocess.max_pixels, 1_000_000);
    assert_eq!(job.preprocess.input_size(), (224, 224));
    assert_eq!(job.target, Target::Predicted);
    assert_eq!(job.interpolate_mode, InterpolateMode::Bilinear);
    assert_eq!(job.guided_rectifiers, vec!["relu", "relu6"]);
    assert_eq!(job.precision, Precision::Bf16);
    assert_eq!(job.devices, Devices::List(vec!["cuda:0".into(), "cuda:1".into()]));
    assert_eq!(job.batch_size, BatchSize::Fixed(16));
    assert_eq!(job.decode_threads, 4);
    assert_eq!(job.output, Loc::from(d.path().join("out/")));
    assert_eq!(job.map_size, 32);
    assert_eq!(job.rows_per_part, 100);
    assert_eq!(
        job.regions,
        vec![("top_right".into(), 0.75, 0.0, 1.0, 0.25), ("centre".into(), 0.25, 0.25, 0.75, 0.75)]
    );
    assert_eq!(job.class_names, None);
    assert_eq!(job.spec_text, FULL);
    let plan = job.to_string();
    for part in [
        "samples.csv",
        "model.pt",
        "shorter side to 256",
        "centre crop 224x224",
        "predicted",
        "cuda:0, cuda:1",
        "batch size:   16",
        "top_right",
    ] {
        assert!(plan.contains(part), "plan lacks {part:?}:\n{plan}");
    }
}

#[test]
fn minimal_spec_takes_defaults() {
    let d = Dir::new();
    let meta = ModelMeta { input_size: Some([224, 224]), resize: Some(256), ..Default::default() };
    let job = resolve(parse(MINIMAL).unwrap(), d.path(), Some(&meta)).unwrap();
    assert_eq!(job.dataset, DatasetSource::ImageFolder(Loc::from(d.path().join("train"))));
    assert_eq!(job.target, Target::Label);
    assert_eq!(job.interpolate_mode, InterpolateMode::Nearest);
    assert_eq!(job.guided_rectifiers, vec!["relu"]);
    assert_eq!(job.precision, Precision::Fp32);
    assert_eq!(job.devices, Devices::List(vec!["cpu".into()]));
    assert_eq!(job.batch_size, BatchSize::Fixed(32));
    assert_eq!(job.workers_per_device, None);
    assert_eq!(job.decode_threads, 0);
    assert_eq!(job.map_size, 64);
    assert_eq!(job.rows_per_part, 1024);
    assert_eq!(job.preprocess.max_pixels, DEFAULT_MAX_PIXELS);
    assert_eq!(job.preprocess.mean, IMAGENET_MEAN.to_vec());
    assert_eq!(job.preprocess.std, IMAGENET_STD.to_vec());
    assert!(job.regions.is_empty());
}

#[test]
fn defaults_from_model_metadata() {
    let d = Dir::new();
    let meta = ModelMeta {
        input_size: Some([200, 180]),
        resize: Some(230),
        channels: Some(1),
        mean: Some(vec![0.5]),
        std: Some(vec![0.25]),
        class_names: Some(vec!["cat".into(), "dog".into()]),
        num_classes: Some(2),
        ..Default::default()
    };
    let job = resolve(parse(MINIMAL).unwrap(), d.path(), Some(&meta)).unwrap();
    assert_eq!(job.preprocess.resize, Resize::ShorterSide(230));
    assert_eq!(job.preprocess.crop, Some((200, 180)));
    assert_eq!(job.preprocess.mean, vec![0.5]);
    assert_eq!(job.preprocess.std, vec![0.25]);
    assert_eq!(job.class_names, Some(vec!["cat".to_string(), "dog".to_string()]));
    assert_eq!(job.num_classes, Some(2));
    assert!(job.to_string().contains("classes:      2 (cat, dog)"));

    // input_size alone: an exact resize to it, no crop.
    let meta = ModelMeta { input_size: Some([128, 96]), ..Default::default() };
    let job = resolve(parse(MINIMAL).unwrap(), d.path(), Some(&meta)).unwrap();
    assert_eq!(job.preprocess.resize, Resize::Exact { h: 128, w: 96 });
    assert_eq!(job.preprocess.crop, None);
    assert_eq!(job.preprocess.input_size(), (128, 96));

    // A spec value wins over the metadata; a single-number resize crops to input_size.
    let text = format!("{MINIMAL}[preprocess]\nresize = 300\n");
    let meta = ModelMeta { input_size: Some([224, 224]), resize: Some(256), ..Default::default() };
    let job = resolve(parse(&text).unwrap(), d.path(), Some(&meta)).unwrap();
    assert_eq!(job.preprocess.resize, Resize::ShorterSide(300));
    assert_eq!(job.preprocess.crop, Some((224, 224)));
    assert!(job.warnings.is_empty(), "{:?}", job.warnings);

    // A size other than the metadata's input_size is allowed (a convolutional model takes any
    // size), with a warning that names the key.
    for (extra, key, size) in
        [("resize = [256, 256]\n", "preprocess.resize", "256x256"), ("crop = 192\n", "preprocess.crop", "192x192")]
    {
        let text = format!("{MINIMAL}[preprocess]\n{extra}");
        let job = resolve(parse(&text).unwrap(), d.path(), Some(&meta)).unwrap();
        assert_eq!(job.warnings.len(), 1, "{:?}", job.warnings);
        let w = &job.warnings[0];
        assert!(w.contains(key) && w.contains(size) && w.contains("input_size [224, 224]"), "{w}");
        assert!(job.to_string().contains(&format!("warning:      {key}")), "{job}");
    }
}

#[test]
fn missing_size_is_explained() {
    let d = Dir::new();
    let err = resolve(parse(MINIMAL).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("preprocess.resize") && err.contains("input_size"), "{err}");

    let text = format!("{MINIMAL}[preprocess]\nresize = 256\n");
    let err = resolve(parse(&text).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("preprocess.crop") && err.contains("batch needs one size"), "{err}");
    assert!(err.contains("line 7"), "{err}");

    let text = format!("{MINIMAL}[preprocess]\nresize = [240, 320]\n");
    let job = resolve(parse(&text).unwrap(), d.path(), None).unwrap();
    assert_eq!(job.preprocess.resize, Resize::Exact { h: 240, w: 320 });
    assert_eq!(job.preprocess.input_size(), (240, 320));
}

#[test]
fn mean_std_must_match_channels() {
    let d = Dir::new();
    let meta = ModelMeta { channels: Some(1), input_size: Some([28, 28]), ..Default::default() };
    // Spec gives 3 values for a 1-channel model: names the key and line 8.
    let err = resolve(parse(FULL).unwrap(), d.path(), Some(&meta)).unwrap_err().to_string();
    assert!(err.contains("preprocess.mean") && err.contains("line 8") && err.contains("1 input channels"), "{err}");
    // Nothing gives mean/std for a 1-channel model.
    let err = resolve(parse(MINIMAL).unwrap(), d.path(), Some(&meta)).unwrap_err().to_string();
    assert!(err.contains("preprocess.mean") && err.contains("1 input channels"), "{err}");
    // mean and std of different lengths within the spec.
    assert_err(&full_with("std", "std = [0.2, 0.2]"), "preprocess.std", 9);
}

/// mean/std on the 0..255 scale (mmcv's convention) are refused, from the spec (naming its
/// line) or from the model's metadata, with the 0..1 values to use.
#[test]
fn mean_std_on_the_0_255_scale_are_refused() {
    let d = Dir::new();
    let text = full_with("mean", "mean = [123.675, 116.28, 103.53]");
    let err = resolve(parse(&text).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("preprocess.mean") && err.contains("line 8") && err.contains("0..255"), "{err}");
    assert!(err.contains("[0.4850, 0.4560, 0.4060]"), "{err}");
    let meta = ModelMeta { std: Some(vec![58.395, 57.12, 57.375]), input_size: Some([224, 224]), ..Default::default() };
    let err = resolve(parse(MINIMAL).unwrap(), d.path(), Some(&meta)).unwrap_err().to_string();
    assert!(err.contains("preprocess.std") && err.contains("from the model's metadata"), "{err}");
    // A std partly above 1 only shrinks the input: not the 0..255 scale. A mean above 1 cannot be
    // a mean of 0..1 pixels. ImageNet's defaults are named as such when they do not fit.
    resolve(parse(&full_with("std", "std = [0.2, 2.0, 0.2]")).unwrap(), d.path(), None).unwrap();
    let err =
        resolve(parse(&full_with("mean", "mean = [0.5, 1.5, 0.5]")).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("preprocess.mean") && err.contains("1.5 is above 1") && !err.contains("divide"), "{err}");
    let meta = ModelMeta { mean: Some(vec![0.5]), input_size: Some([224, 224]), ..Default::default() };
    let err = resolve(parse(MINIMAL).unwrap(), d.path(), Some(&meta)).unwrap_err().to_string();
    assert!(err.contains("preprocess.std: has 3 values (ImageNet's, as neither"), "{err}");
    // 0..1 values pass.
    resolve(parse(FULL).unwrap(), d.path(), None).unwrap();
}

/// A part's maps must fit Arrow's 2 GiB binary column: large maps need smaller parts.
#[test]
fn parts_of_large_maps_are_bounded() {
    let d = Dir::new();
    let text = full_with("map_size", "map_size = 1024").replace("rows_per_part = 100", "rows_per_part = 4096");
    let err = resolve(parse(&text).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("output.rows_per_part") && err.contains("line 23") && err.contains("1024 or fewer"), "{err}");
    // The default 1024 rows fit maps of 1024; 2048 rows of 512 do too.
    resolve(
        parse(&full_with("map_size", "map_size = 1024").replace("rows_per_part = 100\n", "")).unwrap(),
        d.path(),
        None,
    )
    .unwrap();
    let text = full_with("map_size", "map_size = 512").replace("rows_per_part = 100", "rows_per_part = 4096");
    assert!(resolve(parse(&text).unwrap(), d.path(), None).is_ok());
}

#[test]
fn std_must_be_positive() {
    let e = assert_err(&full_with("std", "std = [0.2, 0.0, 0.2]"), "preprocess.std[1]", 9);
    assert!(e.message.contains("above 0"));
}

#[test]
fn relative_and_absolute_paths() {
    let d = Dir::new();
    std::fs::create_dir(d.path().join("jobs")).unwrap();
    let job_file = d.path().join("jobs/job.toml");
    let abs_model = d.path().join("model.pt");
    let text = format!(
        "[dataset]\nmanifest = \"../samples.csv\"\n[model]\npath = {:?}\n[preprocess]\nresize = [224, 224]\n[output]\npath = \"results\"\n",
        abs_model.to_str().unwrap()
    );
    std::fs::write(&job_file, &text).unwrap();
    let mut seen: Option<PathBuf> = None;
    let job = load_with(&job_file, |p| {
        seen = Some(p.to_path_buf());
        Ok(None)
    })
    .unwrap();
    assert_eq!(job.dataset, DatasetSource::Manifest(Loc::from(d.path().join("jobs").join("../samples.csv"))));
    assert_eq!(job.model, abs_model);
    assert_eq!(seen, Some(abs_model));
    assert_eq!(job.output, Loc::from(d.path().join("jobs/results")));
    assert_eq!(job.job_file, job_file);
    assert_eq!(job.spec_text, text);
}

#[test]
fn missing_files_name_the_key() {
    let d = Dir::new();
    let text = FULL.replace("model.pt", "nope.pt");
    let err = resolve(parse(&text).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("model.path") && err.contains("line 4") && err.contains("nope.pt"), "{err}");
    let text = FULL.replace("samples.csv", "nope.csv");
    let err = resolve(parse(&text).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("dataset.manifest") && err.contains("line 2") && err.contains("nope.csv"), "{err}");
    let text = MINIMAL.replace("train", "nope");
    let err = resolve(parse(&text).unwrap(), d.path(), None).unwrap_err().to_string();
    assert!(err.contains("dataset.image_folder") && err.contains("line 2"), "{err}");
    // The spec's output folder is checked only where no `--output` replaces it.
    std::fs::write(d.path().join("out"), "a file").unwrap();
    let job_file = d.path().join("job.toml");
    std::fs::write(&job_file, format!("{MINIMAL}[preprocess]\nresize = [8, 8]\n")).unwrap();
    let job = load_with(&job_file, |_| Ok(None)).unwrap();
    let err = job.check_output().unwrap_err().to_string();
    assert!(err.contains("output.path") && err.contains("line 6") && err.contains("not a folder"), "{err}");
    job.clone().set_output(Loc::from(d.path().join("elsewhere"))).unwrap();
    let err = job.clone().set_output(Loc::from(d.path().join("samples.csv"))).unwrap_err().to_string();
    assert!(err.contains("--output") && err.contains("samples.csv") && err.contains("not a folder"), "{err}");
    let err = load(&d.path().join("absent.toml")).unwrap_err().to_string();
    assert!(err.contains("absent.toml") && err.contains("cannot read"), "{err}");
}

#[test]
fn model_paths_may_be_file_urls_but_not_object_store_urls() {
    let d = Dir::new();
    let url = format!("file://{}", d.path().join("model.pt").display());
    let job = resolve(parse(&FULL.replace("\"model.pt\"", &format!("{url:?}"))).unwrap(), d.path(), None).unwrap();
    assert_eq!(job.model, d.path().join("model.pt"));
    let err = resolve(parse(&FULL.replace("\"model.pt\"", "\"s3://models/m.pt\"")).unwrap(), d.path(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.path") && err.contains("line 4") && err.contains("local file"), "{err}");
}

#[test]
fn metadata_reader_failure_names_the_model() {
    let d = Dir::new();
    let job_file = d.path().join("job.toml");
    std::fs::write(&job_file, FULL).unwrap();
    let err = load_with(&job_file, |_| anyhow::bail!("broken archive")).unwrap_err().to_string();
    assert!(err.contains("model.path") && err.contains("broken archive") && err.contains("line 4"), "{err}");
}

/// A model file that is not TorchScript (here not even a zip archive) is the job's error, named
/// as such, before its missing metadata is taken for missing settings.
#[test]
fn load_refuses_a_model_that_is_not_torchscript() {
    let d = Dir::new();
    let job_file = d.path().join("job.toml");
    std::fs::write(&job_file, FULL).unwrap();
    let err = load(&job_file).unwrap_err().to_string();
    assert!(err.contains("model.path") && err.contains("line 4"), "{err}");
    assert!(err.contains("is not a TorchScript file (not a zip archive"), "{err}");
}

#[test]
fn semantic_errors_name_key_and_line() {
    assert_err(&full_with("batch_size", "batch_size = 0"), "runtime.batch_size", 12);
    assert_err(&full_with("map_size", "map_size = 0"), "output.map_size", 22);
    // Wrong types in words, not Rust's type names.
    let e = assert_err(&full_with("map_size", "map_size = \"big\""), "output.map_size", 22).to_string();
    assert!(e.contains("expected a whole number (0 or more)") && !e.contains("u32"), "{e}");
    let e = assert_err(&full_with("std", "std = [0.2, \"x\", 0.2]"), "preprocess.std", 9).to_string();
    assert!(e.contains("expected a number") && !e.contains("f32"), "{e}");
    assert_err(&full_with("map_size", "map_size = 1025"), "output.map_size", 22);
    assert_err(&full_with("rows_per_part", "rows_per_part = 0"), "output.rows_per_part", 23);
    assert_err(&full_with("interpolate_mode", "interpolate_mode = \"linear\""), "attribution.interpolate_mode", 17);
    assert_err(&full_with("precision", "precision = \"fp16\""), "attribution.precision", 19);
    assert_err(
        &full_with("guided_rectifiers", "guided_rectifiers = [\"relu\", \"gelu\"]"),
        "attribution.guided_rectifiers[1]",
        18,
    );
    assert_err(&full_with("devices", "devices = [\"gpu0\"]"), "runtime.devices[0]", 13);
    assert_err(&full_with("devices", "devices = [\"cuda:x\"]"), "runtime.devices[0]", 13);
    assert_err(&full_with("devices", "devices = \"cuda:0\""), "runtime.devices", 13);
    assert_err(&full_with("devices", "devices = []"), "runtime.devices", 13);
    assert_err(&full_with("decode_threads", "decode_threads = 100000"), "runtime.decode_threads", 14);
    assert_err(&full_with("devices", "devices = [\"cuda\", \"cuda:0\"]"), "runtime.devices[1]", 13);
    assert_err(&full_with("devices", "devices = [\"cuda:1\", \"cuda:01\"]"), "runtime.devices[1]", 13);
    assert_err(&full_with("target", "target = -1"), "attribution.target", 16);
    assert_err(&full_with("target", "target = 1.5"), "attribution.target", 16);
    assert_err(&full_with("max_pixels", "max_pixels = 0"), "preprocess.max_pixels", 10);
    assert_err(&full_with("crop", "crop = [0, 224]"), "preprocess.crop", 7);
    assert_err(&full_with("resize", "resize = [200, 200]"), "preprocess.crop", 7);
    // Regions: outside 0..1, x0 >= x1, y0 >= y1, bad and repeated names.
    assert_err(&full_with("x1", "x1 = 1.5"), "regions[0].x1", 28);
    assert_err(&full_with("x0", "x0 = 1.0"), "regions[0].x1", 28);
    assert_err(&full_with("y1", "y1 = 0.0"), "regions[0].y1", 29);
    assert_err(&full_with("name", "name = \"Top-Right\""), "regions[0].name", 25);
    assert_err(&FULL.replace("\"centre\"", "\"top_right\""), "regions[1].name", 31);
    // Both or neither of manifest / image_folder: names the table's line.
    let both = FULL.replace("manifest = \"samples.csv\"", "manifest = \"samples.csv\"\nimage_folder = \"x\"");
    assert_err(&both, "dataset", 1);
    let neither = FULL.replace("manifest = \"samples.csv\"", "");
    assert_err(&neither, "dataset", 1);
    assert_err(&FULL.replace("samples.csv", "samples.txt"), "dataset.manifest", 2);
}

#[test]
fn type_errors_name_key_and_line() {
    let e = assert_err(&full_with("batch_size", "batch_size = \"big\""), "runtime.batch_size", 12);
    assert!(e.message.contains("\"big\" is not a batch size: a number or \"auto\""), "{e}");
    let e = assert_err(&full_with("batch_size", "batch_size = 1.5"), "runtime.batch_size", 12);
    assert!(e.message.contains("invalid type"), "{e}");
    let e = assert_err(&full_with("batch_size", "batch_size = -3"), "runtime.batch_size", 12);
    assert!(e.message.contains("at least 1"), "{e}");
    assert_err(&full_with("resize", "resize = [1, 2, 3]"), "preprocess.resize", 6);
    assert_err(&full_with("mean", "mean = [0.4, \"x\", 0.4]"), "preprocess.mean[1]", 8);
    assert_err(&full_with("x0", "x0 = \"left\""), "regions[0].x0", 26);
    // Syntax errors give the line.
    let e = parse(&full_with("batch_size", "batch_size = = 3")).unwrap_err();
    assert_eq!(e.line, Some(12), "{e}");
    // A key or table given twice: the line of the second, and its name.
    let e = assert_err(&full_with("crop", "crop = 224\nresize = 300"), "duplicate key `resize`", 8);
    assert_eq!(e.key, None, "{e}");
    assert_err(&format!("{FULL}[runtime]\nbatch_size = 3\n"), "duplicate key `runtime`", 36);
}

#[test]
fn missing_required_keys() {
    let e = parse(&FULL.replace("path = \"out/\"", "")).unwrap_err().to_string();
    assert!(e.contains("output") && e.contains("missing field `path`"), "{e}");
    let e = parse(&FULL.replace("[model]\npath = \"model.pt\"\n", "")).unwrap_err().to_string();
    assert_eq!(e, "job.toml: missing field `model`: the job file needs a [model] section");
    let e = parse(&FULL.replace("name = \"centre\"\n", "")).unwrap_err().to_string();
    assert!(e.contains("regions[1]") && e.contains("missing field `name`"), "{e}");
}

#[test]
fn unknown_keys_in_every_table() {
    let cases = [
        ("[dataset]", "dataset.folder", 2),
        ("[model]", "model.folder", 4),
        ("[preprocess]", "preprocess.folder", 6),
        ("[runtime]", "runtime.folder", 12),
        ("[attribution]", "attribution.folder", 16),
        ("[output]", "output.folder", 21),
    ];
    for (table, key, line) in cases {
        let text = FULL.replacen(table, &format!("{table}\nfolder = 1"), 1);
        let e = assert_err(&text, key, line);
        assert!(e.message.contains("unknown field `folder`"), "{e}");
    }
    let text = FULL.replacen("name = \"top_right\"", "name = \"top_right\"\nfolder = 1", 1);
    assert_err(&text, "regions[0].folder", 26);
    let text = format!("folder = 1\n{FULL}");
    assert_err(&text, "folder", 1);
    let text = format!("{FULL}[extra]\nx = 1\n");
    assert_err(&text, "extra", 36);
}

#[test]
fn target_class_checked_against_model() {
    let d = Dir::new();
    let meta = ModelMeta { num_classes: Some(10), ..Default::default() };
    let text = full_with("target", "target = 10");
    let err = resolve(parse(&text).unwrap(), d.path(), Some(&meta)).unwrap_err().to_string();
    assert!(err.contains("attribution.target") && err.contains("line 16") && err.contains("10 classes"), "{err}");
    let text = full_with("target", "target = 9");
    let job = resolve(parse(&text).unwrap(), d.path(), Some(&meta)).unwrap();
    assert_eq!(job.target, Target::Class(9));
    // A class by its name in the model's metadata; a name it does not have, or a model without
    // names, is the key's error.
    let names = ModelMeta { class_names: Some(vec!["cat".into(), "dog".into()]), ..Default::default() };
    let job = resolve(parse(&full_with("target", "target = \"dog\"")).unwrap(), d.path(), Some(&names)).unwrap();
    assert_eq!(job.target, Target::Class(1));
    let err = resolve(parse(&full_with("target", "target = \"emu\"")).unwrap(), d.path(), Some(&names))
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 16") && err.contains("nor a class name of the model (cat, dog)"), "{err}");
    let err = resolve(parse(&full_with("target", "target = \"dog\"")).unwrap(), d.path(), Some(&meta))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the model's metadata names no classes"), "{err}");
}

#[test]
fn devices_all_and_exact_resize() {
    let d = Dir::new();
    let text = full_with("devices", "devices = \"all\"");
    let job = resolve(parse(&text).unwrap(), d.path(), None).unwrap();
    assert_eq!(job.devices, Devices::All);
    assert!(valid_device("cuda") && valid_device("cuda:12") && valid_device("cpu"));
    assert!(!valid_device("cuda:") && !valid_device("cuda:-1") && !valid_device("mps"));
}

#[test]
fn batch_size_auto_and_workers_per_device() {
    let d = Dir::new();
    let meta = ModelMeta { input_size: Some([224, 224]), resize: Some(256), ..Default::default() };
    let text = full_with("batch_size", "batch_size = \"auto\"\nworkers_per_device = 3");
    let job = resolve(parse(&text).unwrap(), d.path(), Some(&meta)).unwrap();
    assert_eq!(job.batch_size, BatchSize::Auto);
    assert_eq!(job.workers_per_device, Some(3));
    for bad in ["0", "9"] {
        let text = full_with("batch_size", &format!("batch_size = 4\nworkers_per_device = {bad}"));
        let e = assert_err(&text, "runtime.workers_per_device", 13);
        assert!(e.message.contains("must be 1 to 8"), "{e}");
    }
}
