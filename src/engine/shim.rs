//! Safe wrappers over the C++ shim (`cpp/shim.cpp`).

use std::ffi::{c_char, c_int, CStr};
use tch::Tensor;

extern "C" {
    fn sa_set_graph_executor_optimize(on: c_int);
    fn sa_get_graph_executor_optimize() -> c_int;
    fn sa_add_guided_hooks(root: *const torch_sys::C_tensor, kinds: c_int, err: *mut c_char, err_len: usize) -> c_int;
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
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) };
        return Err(msg.to_string_lossy().into_owned());
    }
    Ok(n as usize)
}
