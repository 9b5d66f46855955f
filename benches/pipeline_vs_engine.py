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


def make_jpeg(args):
    root, i = args
    p = os.path.join(root, f"{i:06d}.jpg")
    if os.path.exists(p):
        return
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:375, 0:500]
    img = np.stack([np.sin(x / (7 + c) + rng.uniform(0, 6)) * 60 + np.cos(y / (11 + c)) * 50 + 128
                    for c in range(3)], -1)
    img += rng.normal(0, 12, size=img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)


def make_jpegs(root, n):
    os.makedirs(root, exist_ok=True)
    from multiprocessing import Pool

    with Pool(os.cpu_count()) as pool:
        pool.map(make_jpeg, [(root, i) for i in range(n)], chunksize=64)


def agreement(results):
    """Every variant must give the same rows (different batch sizes and workers change only the
    order of floating-point work): compares them with the first variant's."""
    import pyarrow.parquet as pq

    def rows(out):
        cols = ["id", "status", "predicted", "target_prob", "attr_total", "attr_gini", "attr_entropy", "map_scale"]
        t = pq.read_table(out, columns=cols).to_pydict()
        return {i: rest for i, *rest in zip(*t.values())}

    def max_diff(base, other, k, relative):
        return max((abs(base[i][k] - other[i][k]) / (max(abs(base[i][k]), 1e-30) if relative else 1)
                    for i in base if i in other and base[i][k] is not None and other[i][k] is not None), default=0)

    base = rows(results[0]["out"])
    found = []
    for r in results[1:]:
        other = rows(r["out"])
        d = {"variant": r["variant"], "same_ids": set(other) == set(base),
             "status_differs": sum(base[i][0] != other[i][0] for i in base if i in other),
             "target_prob": max_diff(base, other, 2, False), "attr_total_rel": max_diff(base, other, 3, True),
             "gini": max_diff(base, other, 4, False), "entropy": max_diff(base, other, 5, False),
             "map_scale_rel": max_diff(base, other, 6, True)}
        print(f"rows of '{r['variant']}' vs '{results[0]['variant']}': same ids {d['same_ids']}, status differs "
              f"{d['status_differs']}, max |d target_prob| {d['target_prob']:.2e}, max relative d attr_total "
              f"{d['attr_total_rel']:.2e}, max |d gini| {d['gini']:.2e}, max |d entropy| {d['entropy']:.2e}, "
              f"max relative d map_scale {d['map_scale_rel']:.2e}")
        found.append(d)
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/saliency-audit"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--variants", action="store_true",
                    help="also one worker per device (no overlap), batch_size = \"auto\", the statistics "
                         "where the default does not put them (on the host for CUDA, on libtorch for the CPU), "
                         "and on CUDA a batch of 2048 that runs out of memory")
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
    eng = subprocess.run([a.bin, "-q", "bench", "--model", pt, "--batch-size", str(a.batch), "--iters", "6",
                          "--devices", a.device, "--json"], check=True, capture_output=True, text=True)
    engine = json.loads(eng.stdout)
    runs = [("pipeline (defaults)", {})]
    if a.variants:
        runs += [("one worker per device", {"workers_per_device": 1}), ("batch_size = auto", {"batch_size": '"auto"'})]
        if a.device.startswith("cuda"):
            runs.append(("statistics on the host", {"stats_on_device": "false"}))
            # A batch far too large for the device: every batch runs out of memory, is split,
            # and the workers keep to the size that fitted ("OOM cap"); no sample is lost.
            runs.append(("batch 2048: out of memory, split", {"batch_size": 2048}))
        else:
            runs.append(("statistics in libtorch (CPU)", {"stats_on_device": "true"}))
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    print(f"{a.model}, batch {a.batch}, {a.n} JPEGs 500x375 -> 256 -> 224, {dev}")
    print(f"engine alone (synthetic input): {engine['images_per_s']:8.2f} images/s")
    print(f"{'whole pipeline, JPEG -> Parquet':32s} {'images/s':>9s} {'of engine':>9s} {'batch':>6s} {'workers':>7s} "
          f"{'warm-up s':>9s} {'incl. warm-up':>13s} {'stats on device':>15s} {'OOM cap':>7s}")
    results, failed = [], []
    for i, (name, extra) in enumerate(runs):
        runtime = {"devices": f'["{a.device}"]', "batch_size": str(a.batch), **{k: str(v) for k, v in extra.items()}}
        job = os.path.join(work, f"job{i}.toml")
        with open(job, "w") as f:
            f.write('[dataset]\nmanifest = "samples.csv"\n[model]\npath = "model.pt"\n[runtime]\n'
                    + "".join(f"{k} = {v}\n" for k, v in runtime.items()) + f'[output]\npath = "out{i}"\n')
        r = subprocess.run([a.bin, "-q", "run", job], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: run failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
            failed.append(name)
            continue
        with open(os.path.join(work, f"out{i}", "_run-00000-of-00001.json")) as f:
            run = json.load(f)
        rate = run["images_per_s"]
        with_warm = run["processed"] / (run["elapsed_s"] + run.get("warmup_s", 0.0))
        print(f"{name:32s} {rate:9.2f} {rate / engine['images_per_s']:9.1%} {run.get('batch_size', a.batch):6d} "
              f"{run.get('workers', 1):7d} {run.get('warmup_s', 0.0):9.2f} {with_warm / engine['images_per_s']:13.1%} "
              f"{str(run.get('workers_with_stats_on_device', 0)) + ' of ' + str(run.get('workers', 1)):>15s} "
              f"{str(run.get('batch_size_after_out_of_memory') or '-'):>7s}")
        if run["processed"] + run["resumed_rows"] != a.n:
            print(f"{name}: {run['processed']} of {a.n} samples processed")
            failed.append(name)
        print("  stage busy time (s, summed over threads):", json.dumps(run["stage_busy_s"]))
        results.append({"variant": name, "run": run, "out": os.path.join(work, f"out{i}")})
    agree = agreement(results) if len(results) > 1 else []
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "n": a.n, "device": dev, "engine": engine,
                       "pipeline": results, "agreement": agree, "failed": failed}, f, indent=1)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
