//! The attribution engine against Captum: its own test cases and reference runs in the .venv.

use crate::common::{bin, engine_cases, rel_l2};
use saliency_audit::engine::{
    attribute_npy, read_meta, EngineOptions, FlagsMode, GuidedGradCam, Rectifiers, TargetArg,
};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Case {
    name: String,
    batch: usize,
    interpolate_mode: String,
    predicted: bool,
    n: i64,
    /// Samples whose reference attribution is all zero (the generator avoids them).
    zero_samples: Vec<usize>,
    /// The rectifiers guided backprop clamps (`guided_rectifiers`); Captum's rule is `relu`.
    rectifiers: Vec<String>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(engine_cases().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read(p: &Path) -> Vec<f32> {
    Vec::<f32>::try_from(Tensor::read_npy(p).unwrap().to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn opts(mode: &str) -> EngineOptions {
    EngineOptions { interpolate: mode.parse().unwrap(), rectifiers: Rectifiers::RELU, ..Default::default() }
}

/// Every generated case, in several batches, against Captum's GuidedGradCam (attribution) and
/// LayerGradCam with relu_attributions (CAM): relative L2 ≤ 1e-5 in fp32.
#[test]
fn matches_captum_on_every_case() {
    let dir = engine_cases();
    let cases = cases();
    assert!(cases.len() >= 10);
    let tmp = tempfile::tempdir().unwrap();
    for case in &cases {
        let d = dir.join(&case.name);
        // The ResNet cases' exports fold batch norm (with non-trivial statistics) into the
        // convolutions; Captum runs the unfolded model.
        let folded = read_meta(&d.join("model.pt")).unwrap().unwrap().folded_batchnorm.unwrap_or(0);
        assert_eq!(folded > 0, case.name.starts_with("resnet18"), "{}: {folded} batch norms folded", case.name);
        let out = tmp.path().join(format!("{}_attr.npy", case.name));
        let cam_out = tmp.path().join(format!("{}_cam.npy", case.name));
        let target = if case.predicted { TargetArg::Predicted } else { TargetArg::File(d.join("t.npy")) };
        let run = attribute_npy(
            &d.join("model.pt"),
            &d.join("x.npy"),
            &target,
            &out,
            Some(&cam_out),
            case.batch,
            Device::Cpu,
            EngineOptions {
                rectifiers: Rectifiers::from_names(&case.rectifiers).unwrap(),
                ..opts(&case.interpolate_mode)
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        assert_eq!(run.batches, (case.n as usize).div_ceil(case.batch), "{}", case.name);
        let expected_targets = Vec::<i64>::try_from(Tensor::read_npy(d.join("t.npy")).unwrap()).unwrap();
        assert_eq!(run.targets, expected_targets, "{}: targets", case.name);
        let (got, want) = (read(&out), read(&d.join("ref_attr.npy")));
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-5, "{}: attribution relative L2 error {err:e} > 1e-5", case.name);
        // Sample by sample too, so that a small sample's error is not hidden by a large one's,
        // and no sample is an all-zero attribution (which would check only "CAM = 0").
        assert!(case.zero_samples.is_empty(), "{}: all-zero references {:?}", case.name, case.zero_samples);
        let per = want.len() / case.n as usize;
        for (i, (g, w)) in got.chunks(per).zip(want.chunks(per)).enumerate() {
            let err = rel_l2(g, w);
            assert!(err <= 1e-5, "{} sample {i}: attribution relative L2 error {err:e} > 1e-5", case.name);
        }
        let cam_err = rel_l2(&read(&cam_out), &read(&d.join("ref_cam.npy")));
        assert!(cam_err <= 1e-5, "{}: CAM relative L2 error {cam_err:e} > 1e-5", case.name);
        if case.rectifiers != ["relu"] {
            // The extra rectifiers are what makes the result: guiding ReLUs alone differs.
            let relu_only = tmp.path().join(format!("{}_relu_only.npy", case.name));
            attribute_npy(
                &d.join("model.pt"),
                &d.join("x.npy"),
                &TargetArg::File(d.join("t.npy")),
                &relu_only,
                None,
                case.batch,
                Device::Cpu,
                opts(&case.interpolate_mode),
            )
            .unwrap();
            let err = rel_l2(&read(&relu_only), &want);
            assert!(err > 1e-2, "{}: guiding only ReLUs gives the same result ({err:e})", case.name);
        }
    }
    assert!(cases.iter().any(|c| c.rectifiers.len() > 1), "a case guides ReLU6 and leaky ReLU");
}

/// Several batches give the same result as one, bit for bit up to float noise, and the second
/// and later calls on one replica still find every ReLU (the graph executor's fusion is off).
#[test]
fn batches_after_the_first_equal_a_single_batch() {
    let d = engine_cases().join("resnet18_layer4");
    let x = Tensor::read_npy(d.join("x.npy")).unwrap();
    let t: Vec<Option<i64>> =
        Vec::<i64>::try_from(Tensor::read_npy(d.join("t.npy")).unwrap()).unwrap().into_iter().map(Some).collect();
    let engine = GuidedGradCam::load(&d.join("model.pt"), Device::Cpu, EngineOptions::default()).unwrap();
    let whole = engine.attribute(&x, &t).unwrap();
    let mut guided = Vec::new();
    let mut parts = Vec::new();
    for _ in 0..3 {
        for i in 0..x.size()[0] {
            let r = engine.attribute(&x.narrow(0, i, 1), &t[i as usize..i as usize + 1]).unwrap();
            guided.push(r.guided_nodes);
            parts.push(r.attribution);
        }
    }
    // resnet18: the stem ReLU plus two ReLU calls in each of its 8 blocks.
    assert!(guided.iter().all(|&g| g == 17), "guided ReLU nodes per call: {guided:?}");
    assert_eq!(whole.guided_nodes, 17);
    let n = x.size()[0] as usize;
    for rep in 0..3 {
        let cat = Tensor::cat(&parts[rep * n..(rep + 1) * n], 0);
        let diff = (&cat - &whole.attribution).abs().max().double_value(&[]);
        let scale = whole.attribution.abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale, "repeat {rep}: max diff {diff} vs scale {scale}");
    }
}

/// The engine guides functional ReLUs too (Captum only hooks nn.ReLU modules): the functional
/// model's export has every ReLU node hooked.
#[test]
fn functional_relus_are_guided() {
    let d = engine_cases().join("functional_relu");
    let engine = GuidedGradCam::load(&d.join("model.pt"), Device::Cpu, EngineOptions::default()).unwrap();
    let x = Tensor::read_npy(d.join("x.npy")).unwrap();
    let r = engine.attribute(&x.narrow(0, 0, 2), &[Some(1), Some(2)]).unwrap();
    assert_eq!(r.guided_nodes, 4);
    let off = EngineOptions { rectifiers: Rectifiers::HARDTANH, ..Default::default() };
    let engine = GuidedGradCam::load(&d.join("model.pt"), Device::Cpu, off).unwrap();
    assert_eq!(engine.attribute(&x.narrow(0, 0, 2), &[Some(1), Some(2)]).unwrap().guided_nodes, 0);
}

fn toy(name: &str) -> (Tensor, Tensor) {
    let d = engine_cases().join(name);
    let engine = GuidedGradCam::load(&d.join("model.pt"), Device::Cpu, EngineOptions::default()).unwrap();
    let x = Tensor::read_npy(d.join("x.npy")).unwrap();
    let r = engine.attribute(&x, &[Some(0)]).unwrap();
    (r.attribution, r.cam)
}

fn assert_close(actual: &Tensor, expected: &[f32], what: &str) {
    let a = Vec::<f32>::try_from(actual.flatten(0, -1)).unwrap();
    assert_eq!(a.len(), expected.len(), "{what}: shape");
    // Captum's own check: sum of absolute differences ≤ 0.01.
    let sad: f32 = a.iter().zip(expected).map(|(x, y)| (x - y).abs()).sum();
    assert!(sad <= 0.01, "{what}: got {a:?}, expected {expected:?}");
}

/// Captum's test suite: GuidedGradCam on BasicModel_ConvNet_One_Conv, layer relu1, target 0.
#[test]
fn captum_suite_guided_grad_cam_relu1() {
    let (attr, _) = toy("toy_relu1");
    #[rustfmt::skip]
    let expected = [0.0, 0.0, 4.0, 4.0, 0.0, 0.0, 12.0, 8.0, 28.0, 84.0, 97.5, 65.0, 28.0, 56.0, 65.0, 32.5];
    assert_close(&attr, &expected, "GuidedGradCam relu1");
}

/// Captum's test suite: LayerGradCam conv1 → [[11.25, 13.5], [20.25, 22.5]], relu1 → [[0, 4], [28, 32.5]].
#[test]
fn captum_suite_layer_grad_cam() {
    let (_, cam) = toy("toy_conv1");
    assert_close(&cam, &[11.25, 13.5, 20.25, 22.5], "LayerGradCam conv1");
    let (_, cam) = toy("toy_relu1");
    assert_close(&cam, &[0.0, 4.0, 28.0, 32.5], "LayerGradCam relu1");
}

/// Captum's test suite: LayerGradCam to conv1's input, A[0,0,1,1] = -4: 0.5625 × input, and with
/// relu_attributions (as GuidedGradCam uses) the negative position becomes 0.
#[test]
fn captum_suite_layer_input() {
    let (_, cam) = toy("toy_conv1_input");
    let mut expected: Vec<f32> = (0..16).map(|v| v as f32 * 0.5625).collect();
    expected[5] = 0.0;
    assert_close(&cam, &expected, "LayerGradCam conv1 input");
}

fn err_of(model: &Path, x: &Tensor, targets: &[Option<i64>]) -> String {
    match GuidedGradCam::load(model, Device::Cpu, EngineOptions::default()).and_then(|e| e.attribute(x, targets)) {
        Ok(_) => panic!("{} was accepted", model.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Each contract violation gets one clear error that states the contract.
#[test]
fn contract_violations_are_named() {
    let bad = engine_cases().join("bad");
    let x = Tensor::read_npy(bad.join("x.npy")).unwrap();
    let t = [Some(0), Some(1)];
    let cases = [
        ("single.pt", "single tensor, not a tuple"),
        ("triple.pt", "tuple of 3 values"),
        ("detached.pt", "not on the autograd path"),
        ("detached_logits.pt", "the logits are not on the autograd path"),
        ("offpath.pt", "not on the autograd path to the logits"),
        ("flat.pt", "Grad-CAM needs spatial dimensions"),
    ];
    for (file, what) in cases {
        let msg = err_of(&bad.join(file), &x, &t);
        assert!(msg.contains(what), "{file}: {msg}");
        assert!(msg.contains("returns a tuple (logits [N, classes], activation"), "{file}: no contract in {msg}");
    }
    // The start-up check (`validate`, and `run` before it starts) runs the whole attribution
    // once, so a model whose activation is off the path to the logits fails there, not on
    // every batch of a run (where it looked like a failing device).
    let offpath = GuidedGradCam::load(&bad.join("offpath.pt"), Device::Cpu, EngineOptions::default()).unwrap();
    let msg = format!("{:#}", offpath.probe(3, 8, 8).unwrap_err());
    assert!(msg.contains("not on the autograd path to the logits"), "{msg}");
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.pt");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let msg = err_of(&junk, &x, &t);
    assert!(msg.contains("not a loadable TorchScript file") && msg.contains("junk.pt"), "{msg}");
    let msg = err_of(&tmp.path().join("absent.pt"), &x, &t);
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn bad_targets_shapes_and_values_are_named() {
    let d = engine_cases().join("functional_relu");
    let model = d.join("model.pt");
    let x = Tensor::read_npy(d.join("x.npy")).unwrap().narrow(0, 0, 3);
    let msg = err_of(&model, &x, &[Some(0), Some(7), Some(1)]);
    assert!(msg.contains("target 7 of example 1 is out of range") && msg.contains("7 classes"), "{msg}");
    let msg = err_of(&model, &x, &[Some(0), Some(-1), Some(1)]);
    assert!(msg.contains("target -1 of example 1"), "{msg}");
    let msg = err_of(&model, &x, &[Some(0)]);
    assert!(msg.contains("1 targets for a batch of 3"), "{msg}");
    let nan = x.copy();
    let _ = nan.get(2).get(0).get(3).get(4).fill_(f64::NAN);
    let msg = err_of(&model, &nan, &[Some(0), Some(1), Some(2)]);
    assert!(msg.contains("example 2 holds NaN or Inf"), "{msg}");
    let inf = x.copy();
    let _ = inf.get(1).get(1).get(0).get(0).fill_(f64::INFINITY);
    assert!(err_of(&model, &inf, &[Some(0), Some(1), Some(2)]).contains("example 1 holds NaN or Inf"));
    // One channel into a 3-channel model: the forward error names the input shape.
    let msg = err_of(&model, &x.narrow(1, 0, 1), &[Some(0), Some(1), Some(2)]);
    assert!(msg.contains("forward failed on input [3, 1, 32, 32]"), "{msg}");
    let msg = err_of(&model, &x.get(0), &[Some(0)]);
    assert!(msg.contains("expected [N, C, H, W]"), "{msg}");
}

/// The `attribute` command end to end: .npy in, .npy out, exit codes, errors.
#[test]
fn attribute_command() {
    let d = engine_cases().join("resnet18_layer3_bilinear");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.npy");
    let cam = tmp.path().join("c.npy");
    // `attribute` of the case's model and input with `target`, into `out`, and `extra` flags.
    let attribute = |target: &Path, out: &Path, extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(bin())
            .args(["attribute", "--model"])
            .arg(d.join("model.pt"))
            .arg("--input")
            .arg(d.join("x.npy"))
            .arg("--target")
            .arg(target)
            .arg("--out")
            .arg(out)
            .args(extra)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap()
    };
    let flags = ["--interpolate-mode", "bilinear", "--batch-size", "2", "--device", "cpu", "--cam-out"];
    let mut extra: Vec<&std::ffi::OsStr> = flags.iter().map(std::ffi::OsStr::new).collect();
    extra.push(cam.as_os_str());
    let st = attribute(&d.join("t.npy"), &out, &extra);
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(rel_l2(&read(&out), &read(&d.join("ref_attr.npy"))) <= 1e-5);
    let x = Tensor::read_npy(d.join("x.npy")).unwrap();
    assert_eq!(Tensor::read_npy(&out).unwrap().size(), x.size());
    let cam_err = rel_l2(&read(&cam), &read(&d.join("ref_cam.npy")));
    assert!(cam_err <= 1e-5, "--cam-out against Captum's LayerGradCam: {cam_err:e}");

    // numpy's default float64 is taken as float32; a channels-last array and an integer one
    // are refused with what to do.
    let with_input = |input: &Path, out: &Path| {
        std::process::Command::new(bin())
            .args(["attribute", "--model"])
            .arg(d.join("model.pt"))
            .arg("--input")
            .arg(input)
            .arg("--target")
            .arg(d.join("t.npy"))
            .arg("--out")
            .arg(out)
            .args(["--interpolate-mode", "bilinear"])
            .output()
            .unwrap()
    };
    let x64 = tmp.path().join("x64.npy");
    x.to_kind(Kind::Double).write_npy(&x64).unwrap();
    let out64 = tmp.path().join("a64.npy");
    let st = with_input(&x64, &out64);
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(rel_l2(&read(&out64), &read(&d.join("ref_attr.npy"))) <= 1e-5);
    for (name, t, said) in [
        (
            "nhwc.npy",
            x.permute([0, 2, 3, 1]).contiguous(),
            "looks like [N, H, W, C]; the model takes [N, C, H, W] with C = 3",
        ),
        ("int.npy", x.to_kind(Kind::Int), "expected float32 (x.astype(np.float32))"),
    ] {
        let p = tmp.path().join(name);
        t.write_npy(&p).unwrap();
        let st = with_input(&p, &tmp.path().join("never.npy"));
        let err = String::from_utf8_lossy(&st.stderr);
        assert_eq!(st.status.code(), Some(2), "{err}");
        assert!(err.contains(name) && err.contains(said), "{err}");
    }

    // A bad target file: exit 2 and a message naming the file.
    let bad_t = tmp.path().join("t.npy");
    Tensor::from_slice(&[1i64, 2]).write_npy(&bad_t).unwrap();
    let st = attribute(&bad_t, &out, &[]);
    assert_eq!(st.status.code(), Some(2));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("t.npy") && err.contains("expected [5]"), "{err}");
    // A target out of range in the last batch: refused before any batch runs, naming the file
    // and the example's place in the whole input; nothing written.
    Tensor::from_slice(&[1i64, 2, 0, 1, 99]).write_npy(&bad_t).unwrap();
    let fresh = tmp.path().join("fresh.npy");
    let st = attribute(&bad_t, &fresh, &["--batch-size".as_ref(), "2".as_ref()]);
    let err = String::from_utf8_lossy(&st.stderr);
    assert_eq!(st.status.code(), Some(2), "{err}");
    assert!(err.contains("t.npy: target 99 of example 4 is out of range: the model has 10 classes"), "{err}");
    assert!(!fresh.exists(), "nothing written");
    // An unknown device.
    let st = std::process::Command::new(bin())
        .args([
            "attribute",
            "--model",
            "m.pt",
            "--input",
            "x.npy",
            "--target",
            "0",
            "--out",
            "o.npy",
            "--device",
            "tpu",
        ])
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&st.stderr).contains("unknown device \"tpu\""));
}

/// Fast mode on CPU: channels-last alone stays exact (≤ 1e-5 against Captum); bfloat16 autocast
/// really runs the forward in bfloat16 (the logits come back bfloat16), stays close to
/// Captum's float32 result, keeps every ReLU guided, and leaves the thread in float32 after.
/// The measured errors are printed for BENCHMARKS.md.
#[test]
fn fast_modes_bf16_and_channels_last() {
    for case in ["resnet18_layer4", "vgg11_conv"] {
        let d = engine_cases().join(case);
        let x = Tensor::read_npy(d.join("x.npy")).unwrap();
        let t: Vec<Option<i64>> =
            Vec::<i64>::try_from(Tensor::read_npy(d.join("t.npy")).unwrap()).unwrap().into_iter().map(Some).collect();
        let reference = read(&d.join("ref_attr.npy"));
        let run = |bf16: bool, channels_last: bool| {
            let o = EngineOptions { bf16, channels_last: Some(channels_last), ..Default::default() };
            let engine = GuidedGradCam::load(&d.join("model.pt"), Device::Cpu, o).unwrap();
            let r = engine.attribute(&x, &t).unwrap();
            let attr = Vec::<f32>::try_from(r.attribution.contiguous().flatten(0, -1)).unwrap();
            (r, attr)
        };
        let (exact, exact_attr) = run(false, false);
        assert_eq!(exact.logits_kind, Kind::Float);
        let (cl, cl_attr) = run(false, true);
        assert_eq!(cl.guided_nodes, exact.guided_nodes);
        let cl_err = rel_l2(&cl_attr, &reference);
        assert!(cl_err <= 1e-5, "{case}: channels-last fp32 error {cl_err:e}");
        for channels_last in [false, true] {
            let (fast, fast_attr) = run(true, channels_last);
            assert_eq!(fast.logits_kind, Kind::BFloat16, "{case}: autocast did not run in bfloat16");
            assert_eq!(fast.guided_nodes, exact.guided_nodes, "{case}");
            assert_eq!(fast.attribution.kind(), Kind::Float);
            let err = rel_l2(&fast_attr, &reference);
            let err_exact = rel_l2(&fast_attr, &exact_attr);
            println!("{case}: bf16 (channels_last {channels_last}) relative L2 vs Captum fp32 {err:.4}, vs engine fp32 {err_exact:.4}");
            assert!(err > 1e-4, "{case}: bf16 result equals fp32 ({err:e}): autocast had no effect");
            // About twice what these cases measure (resnet18 0.055, vgg11 0.11), so that a
            // bf16 path that loses precision it need not lose fails.
            let bound = if case.starts_with("resnet18") { 0.11 } else { 0.22 };
            assert!(err < bound, "{case}: bf16 relative L2 error {err:.4} against Captum fp32 (bound {bound})");
        }
        // The guard is gone: the same thread computes in float32 again.
        let (again, again_attr) = run(false, false);
        assert_eq!(again.logits_kind, Kind::Float);
        assert!(rel_l2(&again_attr, &exact_attr) <= 1e-6);
    }
}

/// A traced model froze the exporting process's cuDNN flags into its convolution calls
/// (benchmark off, TF32 allowed: PyTorch's defaults); loading sets them to the job's, in every
/// convolution (ResNet-18 has 20, VGG-11 8), without changing the attribution.
#[test]
fn the_jobs_cudnn_flags_reach_a_traced_models_convolutions() {
    for (case, convolutions) in [("resnet18_layer4", 20), ("vgg11_conv", 8)] {
        let d = engine_cases().join(case);
        let x = Tensor::read_npy(d.join("x.npy")).unwrap();
        let t: Vec<Option<i64>> =
            Vec::<i64>::try_from(Tensor::read_npy(d.join("t.npy")).unwrap()).unwrap().into_iter().map(Some).collect();
        let mut attributions = Vec::new();
        for (benchmark, ieee_fp32) in [(false, false), (true, true), (true, false)] {
            let o = EngineOptions { cudnn_benchmark: benchmark, ieee_fp32, ..Default::default() };
            let engine = GuidedGradCam::load(&d.join("model.pt"), Device::Cpu, o).unwrap();
            let allow_tf32 = !ieee_fp32;
            let count = |mode, (b, tf32)| engine.convolutions_with_flags(b, tf32, mode);
            let r = engine.attribute(&x, &t).unwrap();
            // The stored graphs, and the copies the graph executors made at the first call and
            // run: every call carries the job's flags, none another's.
            for mode in [FlagsMode::Stored, FlagsMode::Executed] {
                assert_eq!(count(mode, (benchmark, allow_tf32)).unwrap(), convolutions, "{case} {mode:?}");
                for other in [(!benchmark, allow_tf32), (benchmark, !allow_tf32)] {
                    assert_eq!(count(mode, other).unwrap(), 0, "{case} {mode:?}: {other:?}");
                }
            }
            attributions.push(Vec::<f32>::try_from(r.attribution.contiguous().flatten(0, -1)).unwrap());
        }
        // On the CPU the flags change nothing: the same numbers, bit for bit.
        assert!(attributions.windows(2).all(|w| w[0] == w[1]), "{case}");
    }
}

/// A 1-channel model's input is PIL's `convert("L")` (what torchvision's `Grayscale` does to
/// the resized, cropped image), for every one of the 2^24 RGB colours.
#[test]
fn luminance_equals_pils_convert_l_for_every_colour() {
    let dir = tempfile::tempdir().unwrap();
    let (rgb_path, l_path) = (dir.path().join("rgb.bin"), dir.path().join("l.bin"));
    let script = "import sys, numpy as np\nfrom PIL import Image\n\
        v = np.arange(1 << 24, dtype=np.uint32)\n\
        rgb = np.stack([v >> 16, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)\n\
        open(sys.argv[1], 'wb').write(rgb.tobytes())\n\
        open(sys.argv[2], 'wb').write(np.asarray(Image.fromarray(rgb).convert('L')).tobytes())\n";
    let status = std::process::Command::new(crate::common::python())
        .args(["-c", script])
        .args([&rgb_path, &l_path])
        .status()
        .unwrap();
    assert!(status.success(), "python failed");
    let rgb = std::fs::read(&rgb_path).unwrap();
    let pil = std::fs::read(&l_path).unwrap();
    assert_eq!(pil.len(), 1 << 24);
    let x = Tensor::from_slice(&rgb).view([1, 4096, 4096, 3]).permute([0, 3, 1, 2]).to_kind(Kind::Float);
    let ours = saliency_audit::engine::batch::luminance(&x);
    assert_eq!(ours.size(), [1, 1, 4096, 4096]);
    let ours = Vec::<f32>::try_from(ours.flatten(0, -1)).unwrap();
    let differ: Vec<(usize, f32, u8)> = ours
        .iter()
        .zip(&pil)
        .enumerate()
        .filter(|(_, (a, b))| **a != **b as f32)
        .map(|(i, (a, b))| (i, *a, *b))
        .take(5)
        .collect();
    assert!(differ.is_empty(), "(colour 0xRRGGBB, ours, PIL's) where they differ: {differ:?}");
}

/// The export helper's mistakes a user makes first: a layer that is not there lists the modules
/// at that level (a model's top-level blocks, not the first paths of its tree), and mean and std
/// given on the 0..255 scale are refused at export, not later by the job.
#[test]
fn export_script_names_the_layers_and_the_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let export = |extra: &[&str]| {
        std::process::Command::new(crate::common::python())
            .arg(crate::common::repo().join("scripts/export_model.py"))
            .args(["--arch", "resnet18", "--out"])
            .arg(tmp.path().join("m.pt"))
            .args(extra)
            .env("PYTHONWARNINGS", "ignore")
            .output()
            .unwrap()
    };
    let o = export(&["--layer", "layer5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("no submodule 'layer5'; the modules at the top level: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc"), "{err}");
    let o = export(&["--layer", "layer4.9"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'layer4.9': 9 is past the end of a sequence of 2"), "{err}");
    let o = export(&["--layer", "layer4", "--mean", "123", "116", "103", "--std", "58", "57", "57"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("must be on the 0..1 scale"), "{err}");
    assert!(!tmp.path().join("m.pt").exists(), "nothing exported");
}
