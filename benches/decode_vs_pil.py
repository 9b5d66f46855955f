#!/usr/bin/env python3
"""The decode stage against what a PyTorch DataLoader worker runs, on one core and one file:
PIL's decode, convert("RGB"), torchvision's Resize(256) (bilinear, antialias) and
CenterCrop(224), against saliency-audit's decode_bytes with the same preprocessing (criterion,
`cargo bench --bench decode`), both in this run. The two give the same bytes
(tests/it/decode.rs); this measures only their speed.

Usage: .venv/bin/python benches/decode_vs_pil.py [--file F.jpg] [--measurement-time 4]
Without --file, a 500x375 JPEG is made as the anchor's script makes its dataset (sines plus
noise of sigma 12, saved by PIL at quality 90).
"""
import argparse
import io
import json
import os
import subprocess
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_file(path):
    rng = np.random.default_rng(0)
    h, w = 375, 500
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 60 * np.sin(x / 40.0), 128 + 60 * np.cos(y / 30.0), 128 + 40 * np.sin((x + y) / 50.0)], -1)
    img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def time_pil(data, rounds=5, n=300):
    import torch
    import torchvision.transforms.functional as TF

    torch.set_num_threads(1)

    def once():
        im = Image.open(io.BytesIO(data)).convert("RGB")
        return TF.center_crop(TF.resize(im, 256, interpolation=TF.InterpolationMode.BILINEAR, antialias=True), 224)

    for _ in range(20):
        once()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            once()
        times.append((time.perf_counter() - t) / n)
    return sorted(times)[len(times) // 2]


def time_rust(path, measurement_time):
    env = dict(os.environ, DECODE_BENCH_FILE=os.path.abspath(path))
    cmd = ["cargo", "bench", "--bench", "decode", "--", "--warm-up-time", "1", "--measurement-time",
           str(measurement_time), "file_resize256_crop224"]
    r = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    est = os.path.join(REPO, "target/criterion/decode/file_resize256_crop224/new/estimates.json")
    with open(est) as f:
        return json.load(f)["median"]["point_estimate"] * 1e-9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file")
    ap.add_argument("--measurement-time", type=float, default=4)
    args = ap.parse_args()
    path = args.file
    if path is None:
        path = os.path.join(REPO, "target/decode-vs-pil.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        make_file(path)
    with open(path, "rb") as f:
        data = f.read()
    rust = time_rust(path, args.measurement_time)
    pil = time_pil(data)
    w, h = Image.open(io.BytesIO(data)).size
    print(f"{os.path.basename(path)}: {w}x{h}, {len(data)} bytes; decode + Resize(256) + CenterCrop(224), one core")
    print("| | ms/image | images/s | vs PIL |")
    print("|---|---|---|---|")
    print(f"| PIL + torchvision (a DataLoader worker's work) | {pil * 1e3:.3f} | {1 / pil:.0f} | 1.00x |")
    print(f"| saliency-audit decode_bytes | {rust * 1e3:.3f} | {1 / rust:.0f} | {pil / rust:.2f}x |")


if __name__ == "__main__":
    main()
