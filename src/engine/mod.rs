//! The attribution engine: TorchScript model, guided-hook shim, guided Grad-CAM.
//!
//! This is the only module that touches tch. Its semantics are Captum's
//! `GuidedGradCam.attribute` (captum 0.9) with `relu_attributions=True` for the CAM, computed
//! with one forward pass instead of Captum's two:
//!
//! 1. one forward with grad enabled (input detached and requiring grad; parameters frozen);
//! 2. the gradient of `Σ_i logits[i, t_i]` w.r.t. the activation (graph kept), channel weights =
//!    its spatial mean, CAM = ReLU(Σ_k w_k·A_k);
//! 3. post-hooks on every rectifier node of the graph clamp the gradients they produce at 0
//!    (guided backprop), then the gradient w.r.t. the input;
//! 4. attribution = guided gradient × CAM upsampled to the input size.

pub mod batch;
pub mod bench;
mod meta;
mod npy;
pub mod reduce;
mod shim;

pub use meta::{check_torchscript, read_meta, ModelMeta, META_FILE};
pub use npy::{attribute_npy, NpyRun, TargetArg};
pub use shim::{disable_graph_optimization, graph_optimization_enabled, FlagsMode};

use crate::exit::RunFailed;
use anyhow::{anyhow, bail, Context, Result};
use batch::catch_libtorch;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{CModule, Device, IValue, Kind, Tensor};

/// What a model file must be. Quoted in every contract error.
pub const CONTRACT: &str = "the model must be a TorchScript file whose forward(x) takes float32 \
[N, C, H, W] and returns a tuple (logits [N, classes], activation [N, K, h, w]), where activation \
is the output (or input) of the Grad-CAM layer on the autograd path from x to the logits; \
scripts/export_model.py makes such files";

/// How the CAM is upsampled to the input's size (as `torch.nn.functional.interpolate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolateMode {
    /// Captum's default.
    #[default]
    Nearest,
    Bilinear,
    Bicubic,
    Area,
}

impl FromStr for InterpolateMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nearest" => Ok(Self::Nearest),
            "bilinear" => Ok(Self::Bilinear),
            "bicubic" => Ok(Self::Bicubic),
            "area" => Ok(Self::Area),
            _ => Err(format!("unknown interpolate mode {s:?}: expected nearest, bilinear, bicubic or area")),
        }
    }
}

/// Which rectifier nodes of the autograd graph guided backprop clamps. Captum guides
/// `nn.ReLU` modules only; this engine guides every ReLU node (module, functional or in-place)
/// and, on request, ReLU6/hardtanh and leaky ReLU nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rectifiers(u32);

impl Rectifiers {
    pub const RELU: Rectifiers = Rectifiers(1);
    pub const HARDTANH: Rectifiers = Rectifiers(2);
    pub const LEAKY_RELU: Rectifiers = Rectifiers(4);

    /// From names: `relu`, `relu6` (or `hardtanh`), `leaky_relu`.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, String> {
        let mut bits = 0;
        for n in names {
            bits |= match n.as_ref() {
                "relu" => 1,
                "relu6" | "hardtanh" => 2,
                "leaky_relu" => 4,
                other => {
                    return Err(format!("unknown rectifier {other:?}: expected relu, relu6, hardtanh or leaky_relu"))
                }
            };
        }
        if bits == 0 {
            return Err("at least one rectifier must be guided".into());
        }
        Ok(Rectifiers(bits))
    }

    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for Rectifiers {
    fn default() -> Self {
        Self::RELU
    }
}

/// A device as jobs and flags name it: `cpu`, `cuda:N`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".to_owned(),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` and checks that the device exists.
pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        // Digits only, as a job's `devices` (`cuda:+1` is no device name).
        _ => match s.strip_prefix("cuda:").filter(|n| n.bytes().all(|b| b.is_ascii_digit())).map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => bail!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(n) = dev {
        let count = cuda_device_count();
        if n >= count {
            bail!("device {s:?} is not available: this machine has {count} CUDA device(s)");
        }
    }
    Ok(dev)
}

/// Number of CUDA devices libtorch sees.
pub fn cuda_device_count() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    }
}

/// Engine options.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineOptions {
    pub interpolate: InterpolateMode,
    pub rectifiers: Rectifiers,
    /// Fast mode: the forward pass under bfloat16 autocast (the backward follows its dtypes).
    /// Off: exact float32, equal to Captum.
    pub bf16: bool,
    /// Parameters and input in the channels-last memory format (faster convolutions on GPUs).
    /// `None`: on for CUDA devices and in bf16 mode, off for fp32 on the CPU (where it is slower).
    pub channels_last: Option<bool>,
    /// cuDNN benchmark mode on CUDA devices: picks the fastest convolution algorithms per shape.
    /// Process-wide (the backward reads it), and written into a traced model's convolution
    /// calls (its forward reads those).
    pub cudnn_benchmark: bool,
    /// Convolutions in full IEEE float32 on CUDA. Off (the default, as in PyTorch): cuDNN may use
    /// TF32 tensor cores for float32 convolutions, as Captum does under PyTorch's defaults.
    /// Process-wide and in the model's convolution calls, as `cudnn_benchmark`.
    pub ieee_fp32: bool,
}

impl EngineOptions {
    /// Whether parameters and input are channels-last on `device`.
    pub fn channels_last_on(&self, device: Device) -> bool {
        self.channels_last.unwrap_or(device.is_cuda() || self.bf16)
    }
}

/// One batch's result. Tensors stay on the engine's device.
pub struct Attribution {
    /// Guided Grad-CAM, float32 of the input's shape.
    pub attribution: Tensor,
    /// Grad-CAM at the layer's resolution, float32 `[N, 1, h, w]`.
    pub cam: Tensor,
    /// Model logits, `[N, classes]`.
    pub logits: Tensor,
    /// The class each example was attributed to.
    pub targets: Vec<i64>,
    /// How many rectifier nodes were guided.
    pub guided_nodes: usize,
    /// The dtype the logits were computed in: bfloat16 in fast mode (the head's matrix product
    /// runs under autocast), float32 otherwise.
    pub logits_kind: Kind,
}

/// A TorchScript model replica on one device, ready to attribute batches.
pub struct GuidedGradCam {
    module: CModule,
    device: Device,
    opts: EngineOptions,
    path: PathBuf,
    meta: ModelMeta,
}

impl GuidedGradCam {
    /// Loads a replica of the model file onto `device`, freezes its parameters and reads its
    /// embedded metadata.
    pub fn load(path: &Path, device: Device, opts: EngineOptions) -> Result<Self> {
        if !path.is_file() {
            bail!("model file {} does not exist", path.display());
        }
        let meta = read_meta(path)?.unwrap_or_default();
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            let msg = torch_message(&e.to_string()).to_owned();
            if device.is_cuda() && device_failure(&msg) {
                // The file was read; the device could not take it (out of memory, a CUDA error).
                return RunFailed(anyhow!("loading {} onto {}: {msg}", path.display(), device_name(device))).into();
            }
            anyhow!(
                "{} is not a loadable TorchScript file ({msg}); a state_dict or a torch.save checkpoint is not \
                 TorchScript: export the model with scripts/export_model.py; {CONTRACT}",
                path.display(),
            )
        })?;
        // libtorch's failures in the calls below (some of which do not return errors) are
        // errors; those that say the device failed are the device's (exit 3), not the file's.
        catch_libtorch(|| Self::prepare(&mut module, path, device, opts)).map_err(|e| {
            let e = e.context(format!("preparing {} on {}", path.display(), device_name(device)));
            if device.is_cuda() && device_failure(&format!("{e:#}")) {
                RunFailed(e).into()
            } else {
                e
            }
        })?;
        let opts = EngineOptions { channels_last: Some(opts.channels_last_on(device)), ..opts };
        Ok(Self { module, device, opts, path: path.to_path_buf(), meta })
    }

    /// Sets a loaded module up for attribution: eval mode, the job's cuDNN flags in a traced
    /// model's convolutions, frozen parameters (channels-last where asked), cuDNN's settings.
    fn prepare(module: &mut CModule, path: &Path, device: Device, opts: EngineOptions) -> Result<()> {
        module.set_eval();
        // A traced model's convolutions carry the cuDNN flags of the exporting process; they
        // get the job's, so the forward follows them as the backward does (on the CPU they
        // change nothing, but the graph is the same on every device).
        let convolutions = shim::set_convolution_flags(module, opts.cudnn_benchmark, !opts.ieee_fp32)
            .map_err(|e| anyhow!("{}: setting the convolutions' cuDNN flags: {e}", path.display()))?;
        tracing::debug!(
            "{}: {convolutions} traced convolution calls set to benchmark = {}, allow_tf32 = {}",
            path.display(),
            opts.cudnn_benchmark,
            !opts.ieee_fp32
        );
        let channels_last = opts.channels_last_on(device);
        for (name, mut p) in module.named_parameters().context("listing the model's parameters")? {
            // No weight gradients are ever computed.
            let _ = p.set_requires_grad(false);
            if channels_last && p.dim() == 4 {
                // The handle shares the module's tensor: set_data changes the parameter itself.
                let cl = shim::channels_last(&p).map_err(|e| anyhow!("{}: parameter {name}: {e}", path.display()))?;
                no_grad(|| p.set_data(&cl));
            }
        }
        if device.is_cuda() {
            if opts.cudnn_benchmark {
                tch::Cuda::cudnn_set_benchmark(true);
            }
            shim::set_cudnn_tf32(!opts.ieee_fp32).map_err(|e| anyhow!("setting cuDNN's float32 precision: {e}"))?;
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// How many of the model's traced convolution calls carry cuDNN's `benchmark` and
    /// `allow_tf32` flags with these values (see [`EngineOptions::cudnn_benchmark`]), in its
    /// stored graphs or in the graph its forward runs (after the first call).
    pub fn convolutions_with_flags(&self, benchmark: bool, allow_tf32: bool, mode: FlagsMode) -> Result<usize> {
        shim::count_convolution_flags(&self.module, benchmark, allow_tf32, mode).map_err(|e| anyhow!(e))
    }

    /// The options, with `channels_last` resolved for this device.
    pub fn options(&self) -> EngineOptions {
        self.opts
    }

    /// Attributes zeros of `[1, channels, h, w]` once and so checks the contract: the forward's
    /// outputs, and gradients that reach the activation and the input (a model that breaks it
    /// fails here, in `validate` or before a run starts, not on every batch). Returns (number of
    /// classes, the layer's spatial size).
    pub fn probe(&self, channels: i64, h: i64, w: i64) -> Result<(i64, Vec<i64>)> {
        let x = Tensor::zeros([1, channels, h, w], (Kind::Float, self.device));
        let a = self.attribute(&x, &[Some(0)])?;
        Ok((a.logits.size()[1], a.cam.size()[2..].to_vec()))
    }

    fn contract_error(&self, what: &str) -> anyhow::Error {
        anyhow!("{}: {what}; {CONTRACT}", self.path.display())
    }

    /// One forward; checks the output's form.
    fn forward(&self, x: &Tensor, n: i64) -> Result<(Tensor, Tensor)> {
        let out = self.module.forward_is(&[IValue::Tensor(x.shallow_clone())]).map_err(|e| {
            anyhow!(
                "{}: forward failed on input {:?}: {}",
                self.path.display(),
                x.size(),
                torch_message(&e.to_string())
            )
        })?;
        let mut parts = match out {
            IValue::Tuple(v) if v.len() == 2 => v,
            IValue::Tuple(v) => {
                return Err(self.contract_error(&format!("forward returned a tuple of {} values, not 2", v.len())))
            }
            IValue::Tensor(_) => return Err(self.contract_error("forward returned a single tensor, not a tuple")),
            _ => return Err(self.contract_error("forward did not return a tuple")),
        };
        let act = match parts.pop() {
            Some(IValue::Tensor(t)) => t,
            _ => return Err(self.contract_error("the tuple's second value is not a tensor")),
        };
        let logits = match parts.pop() {
            Some(IValue::Tensor(t)) => t,
            _ => return Err(self.contract_error("the tuple's first value is not a tensor")),
        };
        let ls = logits.size();
        if ls.len() != 2 || ls[0] != n {
            return Err(self.contract_error(&format!("logits have shape {ls:?}, expected [{n}, classes]")));
        }
        let asz = act.size();
        if asz.len() != 4 || asz[0] != n {
            return Err(self.contract_error(&format!(
                "activation has shape {asz:?}, expected [{n}, K, h, w] (Grad-CAM needs spatial dimensions)"
            )));
        }
        if !act.requires_grad() {
            return Err(self.contract_error("the activation is not on the autograd path from the input"));
        }
        if !logits.requires_grad() {
            // (libtorch's backward from a tensor without a grad_fn would not even fail cleanly.)
            return Err(self.contract_error("the logits are not on the autograd path from the input"));
        }
        Ok((logits, act))
    }

    /// Guided Grad-CAM for a float32 batch `[N, C, H, W]`. `targets[i]` is the class for
    /// example i, `None` for the model's predicted class. An example that holds NaN or Inf is
    /// refused, naming it.
    pub fn attribute(&self, input: &Tensor, targets: &[Option<i64>]) -> Result<Attribution> {
        self.attribute_checked(input, targets, true)
    }

    /// [`attribute`](Self::attribute) for input known to be finite (images normalised by a
    /// finite mean and a positive std): without the check, which on CUDA waits for the upload.
    pub(crate) fn attribute_finite(&self, input: &Tensor, targets: &[Option<i64>]) -> Result<Attribution> {
        self.attribute_checked(input, targets, false)
    }

    fn attribute_checked(&self, input: &Tensor, targets: &[Option<i64>], check: bool) -> Result<Attribution> {
        disable_graph_optimization();
        let size = input.size();
        if size.len() != 4 {
            bail!("input has shape {size:?}, expected [N, C, H, W]");
        }
        let n = size[0];
        if targets.len() as i64 != n {
            bail!("{} targets for a batch of {n} examples", targets.len());
        }
        if n == 0 {
            bail!("empty batch");
        }
        let x = input.to_device(self.device).to_kind(Kind::Float).detach();
        if check {
            check_finite(&x, 0)?;
        }
        let x = if self.opts.channels_last == Some(true) {
            shim::channels_last(&x).map_err(|e| anyhow!("input: {e}"))?
        } else {
            x
        };
        let x = x.set_requires_grad(true);

        // The trace's step times: on CUDA each step's kernels (on this thread's stream) are
        // waited for, only when traced; else a step's time would be its launches only.
        let traced = tracing::enabled!(tracing::Level::TRACE);
        let now = || {
            if let (true, Device::Cuda(d)) = (traced, self.device) {
                if let Err(e) = shim::sync_current_stream(d) {
                    tracing::trace!("waiting for the CUDA stream: {e}");
                }
            }
            std::time::Instant::now()
        };
        // 1. One forward (under bfloat16 autocast in fast mode).
        let t0 = now();
        let (logits, act) = {
            let _autocast = if self.opts.bf16 {
                Some(shim::Bf16Autocast::enter(self.device).map_err(|e| anyhow!("bfloat16 autocast: {e}"))?)
            } else {
                None
            };
            self.forward(&x, n)?
        };
        let classes = logits.size()[1];
        let predicted: Option<Vec<i64>> = if targets.iter().any(Option::is_none) {
            Some(Vec::<i64>::try_from(logits.detach().argmax(1, false).to_device(Device::Cpu))?)
        } else {
            None
        };
        let mut resolved = Vec::with_capacity(targets.len());
        for (i, t) in targets.iter().enumerate() {
            let t = t.unwrap_or_else(|| predicted.as_ref().expect("computed above")[i]);
            if t < 0 || t >= classes {
                bail!(
                    "target {t} of example {i} is out of range: the model has {classes} classes (0..{})",
                    classes - 1
                );
            }
            resolved.push(t);
        }
        let tgt = upload(Tensor::from_slice(&resolved), self.device).view([-1, 1]);
        let sel = logits.gather(1, &tgt, false).sum(Kind::Float);

        let t1 = now();
        // 2. Grad-CAM: standard gradients to the layer, graph kept.
        let grads = Tensor::f_run_backward(&[&sel], &[&act], true, false).map_err(|e| {
            let msg = e.to_string();
            let msg = torch_message(&msg);
            // The contract's cases are checked before and after (a missing gradient comes back
            // undefined, not as an error): this is a failure of the batch (out of memory, a CUDA
            // error). One that every batch would hit fails the start-up check instead.
            anyhow!("{}: backward to the layer failed: {msg}", self.path.display())
        })?;
        let ga = &grads[0];
        if !ga.defined() {
            return Err(self.contract_error("the activation is not on the autograd path to the logits"));
        }
        let cam = no_grad(|| {
            let w = ga.to_kind(Kind::Float).mean_dim(&[2i64, 3][..], true, Kind::Float);
            (w * act.detach().to_kind(Kind::Float)).sum_dim_intlist(&[1i64][..], true, Kind::Float).relu()
        });

        let t2 = now();
        // 3. Guided backprop through the same graph.
        let guided_nodes = shim::add_guided_hooks(&sel, self.opts.rectifiers.bits())
            .map_err(|e| anyhow!("adding guided hooks: {e}"))?;
        let gx = Tensor::f_run_backward(&[&sel], &[&x], false, false).map_err(|e| {
            anyhow!("{}: backward to the input failed: {}", self.path.display(), torch_message(&e.to_string()))
        })?;
        let gx = &gx[0];
        if !gx.defined() {
            return Err(self.contract_error("the logits do not depend on the input"));
        }

        let t3 = now();
        // 4. Guided gradient × upsampled CAM.
        let attribution = no_grad(|| {
            let up = upsample(&cam, size[2], size[3], self.opts.interpolate);
            gx.to_kind(Kind::Float) * up
        });
        tracing::trace!(
            n,
            forward_ms = (t1 - t0).as_secs_f64() * 1e3,
            layer_backward_ms = (t2 - t1).as_secs_f64() * 1e3,
            guided_backward_ms = (t3 - t2).as_secs_f64() * 1e3,
            combine_ms = (now() - t3).as_secs_f64() * 1e3,
            "attributed a batch"
        );
        let logits_kind = logits.kind();
        Ok(Attribution { attribution, cam, logits: logits.detach(), targets: resolved, guided_nodes, logits_kind })
    }
}

/// Runs `f` with gradient tracking off, restoring the thread's mode afterwards even when `f`
/// unwinds (tch's own `no_grad` does not restore it on a panic, and the panic of a failed
/// libtorch call is caught and retried: the retry would then run without gradients).
pub(crate) fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = tch::no_grad_guard();
    f()
}

/// Upsamples `[N, 1, h, w]` to `[N, 1, H, W]` as `F.interpolate(.., size=(H, W), mode)`.
pub fn upsample(cam: &Tensor, h: i64, w: i64, mode: InterpolateMode) -> Tensor {
    match mode {
        InterpolateMode::Nearest => cam.upsample_nearest2d([h, w], None, None),
        InterpolateMode::Bilinear => cam.upsample_bilinear2d([h, w], false, None, None),
        InterpolateMode::Bicubic => cam.upsample_bicubic2d([h, w], false, None, None),
        InterpolateMode::Area => cam.adaptive_avg_pool2d([h, w]),
    }
}

/// A small host tensor (made with `from_slice`) on `device`, copied without waiting: libtorch's
/// blocking copy to a CUDA device waits for everything queued on the stream before it (the
/// whole forward, for targets), where the asynchronous copy of pageable memory is staged at once
/// and runs in stream order.
pub(crate) fn upload(t: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => t,
        d => t.to_device_(d, t.kind(), true, false),
    }
}

/// Errors naming the first example (offset by `first_index`) that holds NaN or Inf.
pub fn check_finite(x: &Tensor, first_index: usize) -> Result<()> {
    let n = x.size()[0];
    if n == 0 || x.numel() == 0 {
        return Ok(());
    }
    let ok = x.isfinite().reshape([n, -1]).all_dim(1, false).to_device(Device::Cpu);
    let ok = Vec::<bool>::try_from(ok)?;
    if let Some(i) = ok.iter().position(|v| !v) {
        bail!("input example {} holds NaN or Inf values", first_index + i);
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}

/// Whether a libtorch error message says that the device (or host) ran out of memory, so that a
/// smaller batch would fit: CUDA's caching allocator, cuDNN and cuBLAS workspaces, libtorch's CPU
/// allocator. PyTorch's cuDNN convolutions try their algorithms in turn, skipping any whose
/// workspace does not fit, and when none is left say only that none was found ("FIND was
/// unable to find an engine …", "Unable to find a valid cuDNN algorithm …"): counted too, since
/// a smaller batch needs smaller workspaces. (A shape no algorithm supports fails at any size:
/// the start-up check, which runs the job's input size, stops the run before it starts.)
pub fn out_of_memory(msg: &str) -> bool {
    let msg = msg.to_ascii_lowercase();
    [
        "out of memory",
        "alloc_failed",
        // cuDNN 9: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED (and HOST_).
        "allocation_failed",
        // cuBLAS creating a handle without the memory for it.
        "cublas_status_not_initialized",
        "can't allocate memory",
        "not enough memory",
        "unable to find an engine",
        "unable to find a valid cudnn algorithm",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

/// Whether a libtorch error says the device failed (out of memory, a CUDA, cuDNN or cuBLAS
/// error) rather than the input or the model.
pub fn device_failure(msg: &str) -> bool {
    let lower = msg.to_ascii_lowercase();
    out_of_memory(msg) || ["cuda error", "cuda driver", "cudnn error", "cublas"].iter().any(|m| lower.contains(m))
}

/// The line of a libtorch error that says what went wrong. An op that fails inside a TorchScript
/// model's forward comes wrapped: the interpreter's banner, the model's traceback, and only then
/// the op's own error (`RuntimeError: CUDA out of memory. Tried to allocate …`), so its first
/// line names no cause; other errors start with theirs.
pub fn torch_message(s: &str) -> &str {
    if !s.contains("failed in the TorchScript interpreter") {
        return first_line(s);
    }
    let is_error_line = |l: &&str| {
        l.split_once(": ").is_some_and(|(name, _)| {
            name.ends_with("Error") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
    };
    s.lines().rev().map(str::trim).find(is_error_line).unwrap_or_else(|| first_line(s))
}

#[cfg(test)]
mod tests {
    use super::{first_line, out_of_memory, torch_message};

    #[test]
    fn the_cause_of_a_failure_inside_torchscript_is_its_last_error_line() {
        // The shape of libtorch 2.11's error for an op that fails in a TorchScript forward (as
        // the interpreter words it; the CPU allocator's message, and CUDA's, as the op's error).
        let wrapped = |cause: &str| {
            format!(
                "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript, \
                 serialized code (most recent call last):\n  File \"code/__torch__.py\", line 8, in forward\n    \
                 y = torch.upsample_nearest2d(x, None, [2000., 2000.])\n        ~~~~~~~~ <--- HERE\n\nTraceback of \
                 TorchScript, original code (most recent call last):\n<stdin>(4): forward\n{cause}\n\nException \
                 raised from handleError at interpreter.cpp:1(most recent call first):\nframe #0: c10::Error::Error()\n"
            )
        };
        let cpu = "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate \
                   memory: you tried to allocate 614400000000 bytes. Error code 12 (Cannot allocate memory)";
        assert_eq!(torch_message(&wrapped(cpu)), cpu);
        assert!(out_of_memory(torch_message(&wrapped(cpu))));
        let cuda = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9.19 GiB. GPU 0 has a total \
                    capacity of 79.19 GiB of which 1.12 GiB is free.";
        assert_eq!(torch_message(&wrapped(cuda)), cuda);
        assert!(out_of_memory(torch_message(&wrapped(cuda))));
        // The interpreter's banner names no cause.
        assert!(!out_of_memory(first_line(&wrapped(cpu))));
        // Other errors start with their cause.
        let plain = "Expected 4-dimensional input for 4-dimensional weight [8, 3, 3, 3]\nException raised from …";
        assert_eq!(torch_message(plain), "Expected 4-dimensional input for 4-dimensional weight [8, 3, 3, 3]");
        assert!(!out_of_memory(torch_message(plain)));
        // cuDNN with no algorithm whose workspace fits (PyTorch's v8 and v7 paths).
        assert!(out_of_memory("RuntimeError: FIND was unable to find an engine to execute this computation"));
        assert!(out_of_memory("Unable to find a valid cuDNN algorithm to run convolution"));
        // cuDNN 9's allocation statuses and cuBLAS's handle creation.
        assert!(out_of_memory("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"));
        assert!(out_of_memory("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"));
        assert!(!out_of_memory("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"));
    }

    /// Device names as a job's `devices` takes them: `cuda:` and digits only.
    #[test]
    fn device_names() {
        assert_eq!(super::parse_device("cpu").unwrap(), tch::Device::Cpu);
        for bad in ["cuda:+1", "cuda:", "cuda:-0", "cuda:1 ", "tpu"] {
            let e = super::parse_device(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("unknown device {bad:?}")), "{e}");
        }
    }
}
