//! Safe wrappers over the C++ shim (`cpp/shim.cpp`).

use std::ffi::{c_char, c_int, CStr};
use tch::Tensor;

extern "C" {
    fn sa_set_graph_executor_optimize(on: c_int);
    fn sa_get_graph_executor_optimize() -> c_int;
    fn sa_add_guided_hooks(root: *const torch_sys::C_tensor, kinds: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_autocast_bf16(cuda: c_int, enter: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn sa_channels_last(t: *const torch_sys::C_tensor, err: *mut c_char, err_len: usize) -> *mut torch_sys::C_tensor;
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
    let mut buf = vec![0 as c_char; 1024];
    let n = unsafe { sa_add_guided_hooks(root.as_ptr(), kinds as c_int, buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return Err(shim_error(&buf));
    }
    Ok(n as usize)
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
        let mut buf = vec![0 as c_char; 512];
        if unsafe { sa_autocast_bf16(cuda, 1, buf.as_mut_ptr(), buf.len()) } < 0 {
            return Err(shim_error(&buf));
        }
        Ok(Bf16Autocast { cuda })
    }
}

impl Drop for Bf16Autocast {
    fn drop(&mut self) {
        let mut buf = vec![0 as c_char; 512];
        if unsafe { sa_autocast_bf16(self.cuda, 0, buf.as_mut_ptr(), buf.len()) } < 0 {
            tracing::warn!("leaving bfloat16 autocast: {}", shim_error(&buf));
        }
    }
}

/// `t` in the channels-last memory format (NHWC strides), keeping its autograd history.
pub fn channels_last(t: &Tensor) -> Result<Tensor, String> {
    let mut buf = vec![0 as c_char; 512];
    let p = unsafe { sa_channels_last(t.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    if p.is_null() {
        return Err(shim_error(&buf));
    }
    Ok(unsafe { Tensor::from_ptr(p) })
}
