#!/usr/bin/env bash
# One-time, idempotent set-up: the project's .venv (torch 2.11.0 = the libtorch that tch 0.24
# links against, Captum, torchvision) and the .venv/libtorch link that .cargo/config.toml points
# torch-sys at. Steps already done are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# 3.11: the pinned scikit-learn, scikit-image and matplotlib, and Pillow 13, need it.
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "setup: need Python >= 3.11 as \$PYTHON or python3" >&2
  exit 2
fi
command -v cargo >/dev/null || { echo "setup: need a Rust toolchain (cargo, from rustup)" >&2; exit 2; }
# 1.89: the oldest Rust the locked crates (nalgebra, arrow, parquet, ...) build with.
rust=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
if [ -z "$rust" ] || [ "$(echo "$rust" | awk '{print ($1 > 1 || $2 >= 89)}')" != 1 ]; then
  echo "setup: need Rust >= 1.89 (found: $(rustc --version 2>/dev/null || echo none); rustup update)" >&2
  exit 2
fi
# The C++ shim (cpp/shim.cpp) is compiled against libtorch's headers.
command -v "${CXX:-c++}" >/dev/null || command -v g++ >/dev/null ||
  { echo "setup: need a C++17 compiler (g++; apt install g++)" >&2; exit 2; }
# On x86, nasm assembles libjpeg-turbo's SIMD code when cargo builds the JPEG decoder
# (mozjpeg-sys; without nasm it would quietly build a decoder half as fast, so build.rs stops).
case "$(uname -m)" in x86_64 | i?86) need_nasm=1 ;; *) need_nasm=0 ;; esac
if [ "$need_nasm" = 1 ] && ! command -v nasm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's nasm (the JPEG decoder's SIMD code is assembled at build time)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nasm >/dev/null
  else
    echo "setup: need nasm to build the JPEG decoder's SIMD code (apt install nasm, dnf install nasm, brew install nasm)" >&2
    exit 2
  fi
fi

req=scripts/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
# A .venv left half-made (no pip: python3-venv was missing when it was created) is made again.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "setup: creating .venv"
  rm -rf .venv
  if ! "$PY" -m venv .venv; then
    rm -rf .venv
    echo "setup: $PY cannot create a virtual environment with pip (on Debian or Ubuntu: apt install python3-venv)" >&2
    exit 2
  fi
fi
# Free space on the disk holding .venv, in GiB (rounded down).
free_gib() { df -Pk "${1:-.}" | awk 'NR == 2 { print int($4 / 1048576) }'; }
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # The wheels (about 3.5 GB: torch and the CUDA libraries it links) are downloaded before
  # anything is installed (about 5.5 GB), and the release build that follows takes about 4 GB.
  need=10
  have=$(free_gib .)
  if [ "$have" -lt "$need" ]; then
    echo "setup: $have GiB free on the disk of $(pwd); installing .venv needs about $need GiB" \
      "(torch's wheels, then the installed packages), and the build about 4 GiB more" >&2
    exit 2
  fi
  echo "setup: installing $(grep -v '^#' "$req" | tr '\n' ' ')(about 5.5 GB, first time only)"
  # No pip cache: it would keep a second copy of the 3.5 GB of wheels. The wheels are unpacked
  # on the disk checked above, not in /tmp (often a small tmpfs).
  mkdir -p .venv/.tmp
  TMPDIR="$PWD/.venv/.tmp" .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$req"
  rm -rf .venv/.tmp
  echo "$want" > "$stamp"
fi
torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$version" != "2.11.0" ]; then
  echo "setup: .venv has torch $version, tch 0.24 needs 2.11.0" >&2
  exit 2
fi
ln -sfn "$torch_dir" .venv/libtorch
echo "setup: ok (libtorch at .venv/libtorch -> $torch_dir)"
