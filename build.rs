//! Build script: compiles the C++ guided-hook shim against the same libtorch as torch-sys,
//! embeds an rpath to libtorch so the binary runs without LD_LIBRARY_PATH, and keeps
//! libtorch_cuda linked (`--no-as-needed`) so CUDA devices are not silently dropped.

use std::env;
use std::path::PathBuf;

fn main() {
    require_nasm();
    println!("cargo:rerun-if-changed=cpp/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report its libtorch lib folder (DEP_TCH_LIBTORCH_LIB)"),
    );
    let root = lib.parent().expect("libtorch lib folder has a parent").to_path_buf();
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());

    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("cpp/shim.cpp")
        .compile("saliency_shim");

    // The binary, tests and benches find libtorch through an rpath, not LD_LIBRARY_PATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The CUDA build of libtorch registers its CUDA backend only if libtorch_cuda is loaded;
    // nothing references it by symbol, so --as-needed would drop it.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// On x86, mozjpeg-sys assembles libjpeg-turbo's SIMD code with nasm, and without nasm it only
/// warns and builds a JPEG decoder half as fast: stop instead, saying what to do.
fn require_nasm() {
    println!("cargo:rerun-if-env-changed=PATH");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if !matches!(arch.as_str(), "x86_64" | "x86") {
        return;
    }
    let found = std::process::Command::new("nasm").arg("-v").output().is_ok_and(|o| o.status.success());
    if !found {
        panic!(
            "nasm is not installed: it assembles the JPEG decoder's SIMD code (libjpeg-turbo). \
             Install it (scripts/setup.sh does, as root; or apt install nasm, dnf install nasm, \
             brew install nasm), then run `cargo clean -p mozjpeg-sys` so the decoder is built \
             again with it"
        );
    }
}
