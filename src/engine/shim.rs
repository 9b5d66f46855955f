//! Safe wrappers over the C++ shim (`cpp/shim.cpp`).

use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{CModule, Tensor};

extern "C" {
    fn sa_set_graph_executor_optimize(on: c_int);
    fn sa_get_graph_executor_optimize() -> c_int;
    fn sa_add_guided_hooks(root: *const torch_sys::C_tensor, kinds: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_autocast_bf16(cuda: c_int, enter: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_channels_last(t: *const torch_sys::C_tensor, err: *mut c_char, err_len: usize) -> *mut torch_sys::C_tensor;
    fn sa_cuda_pool_stream(device: c_int, id: *mut i64, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_cuda_set_stream(device: c_int, id: i64, previous: *mut i64, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_set_cudnn_tf32(allow: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_cuda_sync_current_stream(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_convolution_flags(
        module: *mut c_void,
        benchmark: c_int,
        allow_tf32: c_int,
        mode: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn sa_empty_pinned_u8(numel: i64, err: *mut c_char, err_len: usize) -> *mut torch_sys::C_tensor;
    fn sa_to_host_f32(
        t: *const torch_sys::C_tensor,
        pinned: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut torch_sys::C_tensor;
}

/// Calls a shim function that reports failure through a message buffer.
fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut buf = vec![0 as c_char; 512];
    if f(buf.as_mut_ptr(), buf.len()) < 0 {
        return Err(shim_error(&buf));
    }
    Ok(())
}

/// Calls a shim function that returns a new tensor, or null and a message.
fn new_tensor(f: impl FnOnce(*mut c_char, usize) -> *mut torch_sys::C_tensor) -> Result<Tensor, String> {
    let mut buf = vec![0 as c_char; 512];
    let p = f(buf.as_mut_ptr(), buf.len());
    if p.is_null() {
        return Err(shim_error(&buf));
    }
    Ok(unsafe { Tensor::from_ptr(p) })
}

/// Turns the TorchScript graph executor's optimisation off for the calling thread.
///
/// With it on, the executor fuses ReLUs into DifferentiableGraph nodes from the second call on,
/// so the guided hooks would miss them. The setting is per thread: every thread that runs a
/// model calls this (the engine does it on each call).
pub fn disable_graph_optimization() {
    unsafe { sa_set_graph_executor_optimize(0) }
}

/// Whether the calling thread's graph executor optimises (for tests).
pub fn graph_optimization_enabled() -> bool {
    unsafe { sa_get_graph_executor_optimize() != 0 }
}

/// Adds a clamp-at-zero post-hook to every rectifier node (per `kinds`, a bit mask of
/// [`super::Rectifiers`]) of the autograd graph behind `root`. Returns how many were hooked.
pub fn add_guided_hooks(root: &Tensor, kinds: u32) -> Result<usize, String> {
    let mut hooked = 0;
    call(|e, n| {
        hooked = unsafe { sa_add_guided_hooks(root.as_ptr(), kinds as c_int, e, n) };
        hooked
    })?;
    Ok(hooked as usize)
}

fn shim_error(buf: &[c_char]) -> String {
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// bfloat16 autocast for the calling thread while this guard lives (as `torch.autocast(device,
/// dtype=torch.bfloat16)`): matrix products and convolutions run in bfloat16, reductions and
/// the rest stay float32. Must be dropped on the thread that made it.
pub struct Bf16Autocast {
    cuda: c_int,
}

impl Bf16Autocast {
    pub fn enter(device: tch::Device) -> Result<Bf16Autocast, String> {
        let cuda = c_int::from(device.is_cuda());
        call(|e, n| unsafe { sa_autocast_bf16(cuda, 1, e, n) })?;
        Ok(Bf16Autocast { cuda })
    }
}

impl Drop for Bf16Autocast {
    fn drop(&mut self) {
        let cuda = self.cuda;
        if let Err(e) = call(|e, n| unsafe { sa_autocast_bf16(cuda, 0, e, n) }) {
            tracing::warn!("leaving bfloat16 autocast: {e}");
        }
    }
}

/// `t` in the channels-last memory format (NHWC strides), keeping its autograd history.
pub fn channels_last(t: &Tensor) -> Result<Tensor, String> {
    new_tensor(|e, n| unsafe { sa_channels_last(t.as_ptr(), e, n) })
}

/// A CUDA stream from libtorch's pool. Work queued on different streams may overlap on the
/// device, and waiting for one stream does not wait for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaStream {
    device: c_int,
    id: i64,
}

impl CudaStream {
    /// A stream of CUDA device `device` from the pool (the pool hands them out round-robin).
    pub fn from_pool(device: usize) -> Result<CudaStream, String> {
        let (device, mut id) = (device as c_int, 0i64);
        call(|e, n| unsafe { sa_cuda_pool_stream(device, &mut id, e, n) })?;
        Ok(CudaStream { device, id })
    }

    /// Makes this stream the calling thread's current stream on its device until the guard is
    /// dropped (on the same thread), which restores the previous one.
    pub fn enter(&self) -> Result<StreamGuard, String> {
        let mut previous = 0i64;
        call(|e, n| unsafe { sa_cuda_set_stream(self.device, self.id, &mut previous, e, n) })?;
        Ok(StreamGuard { device: self.device, previous })
    }
}

/// Waits until the calling thread's current stream on CUDA device `device` has done its work;
/// other streams (another worker's) go on.
pub fn sync_current_stream(device: usize) -> Result<(), String> {
    call(|e, n| unsafe { sa_cuda_sync_current_stream(device as c_int, e, n) })
}

/// Restores the thread's previous current stream when dropped.
pub struct StreamGuard {
    device: c_int,
    previous: i64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut ignored = 0i64;
        if let Err(e) = call(|e, n| unsafe { sa_cuda_set_stream(self.device, self.previous, &mut ignored, e, n) }) {
            tracing::warn!("restoring the CUDA stream: {e}");
        }
    }
}

/// Lets cuDNN use TF32 tensor cores for float32 convolutions (PyTorch's default) or not;
/// process-wide.
pub fn set_cudnn_tf32(allow: bool) -> Result<(), String> {
    call(|e, n| unsafe { sa_set_cudnn_tf32(c_int::from(allow), e, n) })
}

/// The `torch::jit::Module*` that a [`CModule`] holds. tch keeps it private; it is the
/// struct's only field, which the size check below pins to offset 0.
fn module_ptr(module: &CModule) -> *mut c_void {
    const _: () = assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut c_void>());
    // SAFETY: CModule's one field is that pointer, and the struct is no larger than it.
    unsafe { *(module as *const CModule as *const *mut c_void) }
}

/// Sets cuDNN's `benchmark` and `allow_tf32` flags in every convolution call of a traced
/// model, where export froze them (see `sa_convolution_flags` in cpp/shim.cpp): without this
/// its forward ignores the process-wide settings. Before the first forward. Returns how many
/// calls it set.
pub fn set_convolution_flags(module: &mut CModule, benchmark: bool, allow_tf32: bool) -> Result<usize, String> {
    convolution_flags(module, benchmark, allow_tf32, FlagsMode::Set)
}

/// Where [`count_convolution_flags`] looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagsMode {
    /// The module's stored method graphs.
    Stored = 0,
    /// Writes the flags (only through [`set_convolution_flags`]).
    Set = 1,
    /// The methods' optimised graphs: each method's copy of its graph, made on its first call
    /// and kept, from which its graph executor's plans are copied (made now if there is none).
    Executed = 2,
}

/// How many convolution calls of a traced model carry exactly these flags, in its stored
/// graphs or in the graph its `forward` runs (for tests).
pub fn count_convolution_flags(
    module: &CModule,
    benchmark: bool,
    allow_tf32: bool,
    mode: FlagsMode,
) -> Result<usize, String> {
    assert_ne!(mode, FlagsMode::Set, "count_convolution_flags only counts");
    convolution_flags(module, benchmark, allow_tf32, mode)
}

fn convolution_flags(module: &CModule, benchmark: bool, allow_tf32: bool, mode: FlagsMode) -> Result<usize, String> {
    let (ptr, mut count) = (module_ptr(module), 0);
    let flags = [benchmark, allow_tf32].map(c_int::from);
    call(|e, n| {
        count = unsafe { sa_convolution_flags(ptr, flags[0], flags[1], mode as c_int, e, n) };
        count
    })?;
    Ok(count as usize)
}

/// A new contiguous uint8 host tensor of `numel` elements in page-locked memory (needs CUDA).
pub fn empty_pinned_u8(numel: usize) -> Result<Tensor, String> {
    new_tensor(|e, n| unsafe { sa_empty_pinned_u8(numel as i64, e, n) })
}

/// `t` copied into a new contiguous float32 host tensor of its shape, page-locked when `pinned`
/// (needs CUDA); the copy runs on the current stream and is waited for.
pub fn to_host_f32(t: &Tensor, pinned: bool) -> Result<Tensor, String> {
    new_tensor(|e, n| unsafe { sa_to_host_f32(t.as_ptr(), c_int::from(pinned), e, n) })
}
