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
import atexit
import json
import os
import shutil
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
    ap.add_argument("--iters", type=int, default=10, help="timed batches of the engine alone")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches of the engine alone first")
    ap.add_argument("--variants", action="store_true",
                    help="also one worker per device (no overlap), batch_size = \"auto\", the statistics "
                         "where the default does not put them (on the host for CUDA, on libtorch for the CPU), "
                         "and on CUDA a batch of 4096 that runs out of memory")
    a = ap.parse_args()
    import torchvision

    work = tempfile.mkdtemp(prefix="sa-pipe-")
    # The exported model, inputs and outputs (about 100 MB): removed however the script ends,
    # short of being killed.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
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
    cuda = a.device.startswith("cuda")
    dev = torch.cuda.get_device_name(torch.device(a.device)) if cuda else f"cpu ({os.cpu_count()} cores)"
    print(f"{a.model}, batch {a.batch}, {a.n} JPEGs 500x375 -> 256 -> 224, {dev}", flush=True)
    failed = []
    eng = subprocess.run([a.bin, "-q", "bench", "--model", pt, "--batch-size", str(a.batch), "--iters", str(a.iters),
                          "--warmup", str(a.warmup), "--devices", a.device, "--json"], capture_output=True, text=True)
    if eng.returncode == 0:
        engine = json.loads(eng.stdout)
        print(f"engine alone (synthetic input): {engine['images_per_s']:8.2f} images/s", flush=True)
    else:
        # The pipeline's rows do not need it: they are still measured, without the ratio.
        engine = None
        print(f"engine alone: bench failed ({eng.returncode}): {eng.stderr.strip()[-1500:]}", flush=True)
        failed.append("engine alone")
    # Each variant: (name, runtime settings, check of its summary on CUDA: None or why it failed).
    runs = [("pipeline (defaults)", {}, lambda r: None if r.get("workers_with_stats_on_device") == r.get("workers")
             else "the statistics should be on the device for every worker (see its warnings)")]
    if a.variants and cuda:
        # The new questions first: statistics on the host against the device's, and the split.
        runs.append(("statistics on the host", {"stats_on_device": "false"},
                     lambda r: None if r.get("workers_with_stats_on_device") == 0 else "statistics not on the host"))
        # A batch far too large for the device (ResNet-50's engine keeps about 60 MiB an image
        # for the backward, measured on the CPU: 4096 do not fit 80 or 141 GB), one worker so that only the batch's own size
        # counts: it runs out of memory, is split, and the worker keeps to the size that fitted
        # ("OOM cap"); no sample is lost.
        # cuDNN's benchmark mode off: this variant tests the split, and a search over every
        # algorithm at such shapes, near the memory's limit, would only cost time.
        runs.append(("batch 4096: out of memory, split",
                     {"batch_size": 4096, "workers_per_device": 1, "cudnn_benchmark": "false"},
                     lambda r: None if r.get("batch_size_after_out_of_memory") else "no batch ran out of memory"))
        runs += [("one worker per device", {"workers_per_device": 1}, None),
                 ("batch_size = auto", {"batch_size": '"auto"'}, None)]
    elif a.variants:
        runs += [("one worker per device", {"workers_per_device": 1}, None),
                 ("batch_size = auto", {"batch_size": '"auto"'}, None),
                 ("statistics in libtorch (CPU)", {"stats_on_device": "true"}, None)]
    ratio = (lambda rate: f"{rate / engine['images_per_s']:9.1%}") if engine else (lambda rate: f"{'-':>9s}")
    print(f"{'whole pipeline, JPEG -> Parquet':32s} {'images/s':>9s} {'of engine':>9s} {'batch':>6s} {'workers':>7s} "
          f"{'warm-up s':>9s} {'incl. warm-up':>9s} {'stats on device':>15s} {'OOM cap':>7s}", flush=True)
    results = []
    for i, (name, extra, check) in enumerate(runs):
        runtime = {"devices": f'["{a.device}"]', "batch_size": str(a.batch), **{k: str(v) for k, v in extra.items()}}
        job = os.path.join(work, f"job{i}.toml")
        with open(job, "w") as f:
            f.write('[dataset]\nmanifest = "samples.csv"\n[model]\npath = "model.pt"\n[runtime]\n'
                    + "".join(f"{k} = {v}\n" for k, v in runtime.items()) + f'[output]\npath = "out{i}"\n')
        # Warnings (a device whose statistics disagree with the host's, a batch out of memory)
        # and the start-up's own lines are shown; -q alone would hide them.
        env = dict(os.environ, RUST_LOG="warn,saliency_audit::run=info")
        r = subprocess.run([a.bin, "-q", "run", job], capture_output=True, text=True, env=env)
        said = [line for line in r.stderr.splitlines()
                if any(k in line for k in ("WARN", "ERROR", "statistics", "warmed up", "out of memory"))]
        summary_file = os.path.join(work, f"out{i}", "_run-00000-of-00001.json")
        # Exit 1 is a complete run with failed samples: its summary still stands.
        if r.returncode not in (0, 1) or not os.path.exists(summary_file):
            print(f"{name}: run failed ({r.returncode}): {r.stderr.strip()[-2000:]}", flush=True)
            failed.append(name)
            continue
        with open(summary_file) as f:
            run = json.load(f)
        rate = run["images_per_s"]
        with_warm = run["processed"] / (run["elapsed_s"] + run.get("warmup_s", 0.0))
        print(f"{name:32s} {rate:9.2f} {ratio(rate)} {run.get('batch_size', a.batch):6d} "
              f"{run.get('workers', 1):7d} {run.get('warmup_s', 0.0):9.2f} {ratio(with_warm)} "
              f"{str(run.get('workers_with_stats_on_device', 0)) + ' of ' + str(run.get('workers', 1)):>15s} "
              f"{str(run.get('batch_size_after_out_of_memory') or '-'):>7s}", flush=True)
        if run["processed"] + run["resumed_rows"] != a.n or r.returncode != 0:
            print(f"{name}: {run['processed']} of {a.n} samples processed, statuses {json.dumps(run.get('counts'))}")
            failed.append(name)
        why = check(run) if check and cuda else None
        if why:
            print(f"CHECK FAILED: {name}: {why}")
            failed.append(name)
        for line in said[:8]:
            print("  log:", line[-400:])
        print("  stage busy time (s, summed over threads):", json.dumps(run["stage_busy_s"]), flush=True)
        results.append({"variant": name, "run": run, "out": os.path.join(work, f"out{i}"), "log": said[:20]})
    agree = agreement(results) if len(results) > 1 else []
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "n": a.n, "device": dev, "engine": engine,
                       "pipeline": results, "agreement": agree, "failed": failed}, f, indent=1)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
