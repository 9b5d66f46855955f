#!/usr/bin/env python3
"""Whole pipeline vs the engine alone, same model, batch and device, in one run.

Makes N JPEG photos-like files (500x375, quality 90), exports a randomly initialised torchvision
model, times `saliency-audit bench` (synthetic input, engine only) and `saliency-audit run` over
the JPEGs (decode, resize/crop, attribution, statistics, map encoding, Parquet), and prints the
pipeline's rate as a fraction of the engine's.

Usage: .venv/bin/python benches/pipeline_vs_engine.py [--n 256] [--model resnet18] [--batch 8]
       [--device cpu] [--bin target/release/saliency-audit]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from export_model import export  # noqa: E402

LAYERS = {"resnet18": "layer4", "resnet50": "layer4", "vgg16": "features.29"}


def make_jpegs(root, n):
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        p = os.path.join(root, f"{i:06d}.jpg")
        if os.path.exists(p):
            continue
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:375, 0:500]
        img = np.stack([np.sin(x / (7 + c) + rng.uniform(0, 6)) * 60 + np.cos(y / (11 + c)) * 50 + 128
                        for c in range(3)], -1)
        img += rng.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/saliency-audit"))
    a = ap.parse_args()
    import torchvision

    work = tempfile.mkdtemp(prefix="sa-pipe-")
    jpegs = os.path.join(ROOT, ".cache", "bench-jpegs")
    make_jpegs(jpegs, a.n)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(weights=None).eval()
    pt = os.path.join(work, "model.pt")
    export(model, LAYERS[a.model], False, torch.randn(2, 3, 224, 224),
           {"architecture": a.model, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, pt)
    with open(os.path.join(work, "samples.csv"), "w") as f:
        f.write("path,label\n")
        for i in range(a.n):
            f.write(f"{jpegs}/{i:06d}.jpg,{i % 1000}\n")
    with open(os.path.join(work, "job.toml"), "w") as f:
        f.write(f'[dataset]\nmanifest = "samples.csv"\n[model]\npath = "model.pt"\n'
                f'[runtime]\ndevices = ["{a.device}"]\nbatch_size = {a.batch}\n[output]\npath = "out"\n')
    eng = subprocess.run([a.bin, "-q", "bench", "--model", pt, "--batch-size", str(a.batch), "--iters", "6",
                          "--devices", a.device, "--json"], check=True, capture_output=True, text=True)
    engine = json.loads(eng.stdout)
    subprocess.run([a.bin, "-q", "run", os.path.join(work, "job.toml")], check=True, capture_output=True)
    with open(os.path.join(work, "out", "_run-00000-of-00001.json")) as f:
        run = json.load(f)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    print(f"{a.model}, batch {a.batch}, {a.n} JPEGs 500x375 -> 256 -> 224, {dev}")
    print(f"engine alone (synthetic input): {engine['images_per_s']:8.2f} images/s")
    print(f"whole pipeline (JPEG -> Parquet): {run['images_per_s']:8.2f} images/s "
          f"= {run['images_per_s'] / engine['images_per_s']:.1%} of the engine")
    print("pipeline stage busy time (s):", json.dumps(run["stage_busy_s"]))


if __name__ == "__main__":
    main()
