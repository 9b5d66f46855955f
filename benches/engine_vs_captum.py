#!/usr/bin/env python3
"""Engine vs Captum, same model, batch, input size and thread count, in one run.

Exports a randomly initialised torchvision model with scripts/export_model.py, times Captum's
GuidedGradCam on the eager model in this process (and, as a second peer, a lean one-forward
PyTorch version), runs `saliency-audit bench` on the export in a subprocess, and prints a table
with images/s, peak memory above the loaded model, and the ratios.

Usage: .venv/bin/python benches/engine_vs_captum.py [--model resnet18] [--batch 8] [--size 224]
       [--threads 2] [--iters 6] [--device cpu] [--bin target/release/saliency-audit]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from export_model import export, resolve_layer  # noqa: E402

LAYERS = {"resnet18": "layer4", "resnet50": "layer4", "vgg16": "features.29", "vgg11": "features.18"}
RELU_NODES = ("ReluBackward", "ThresholdBackward")


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, warm, iters):
    base = rss("VmRSS:")
    reset_peak()
    for _ in range(warm):
        fn()
    sync(dev)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    ts.sort()
    peak = rss("VmHWM:") - base if dev.type == "cpu" else None
    return ts[len(ts) // 2], peak


def lean(model, layer, x, tgt, bf16=False):
    """One forward, standard backward to the layer, guided backward to the input."""
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    h.remove()
    a = acts["a"]
    sel = logits.gather(1, tgt.view(-1, 1)).sum()
    (ga,) = torch.autograd.grad(sel, a, retain_graph=True)
    cam = F.relu((ga.float().mean(dim=(2, 3), keepdim=True) * a.float()).sum(1, keepdim=True))
    seen, stack = set(), [sel.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name().startswith(RELU_NODES):
            node.register_hook(lambda gi, go: tuple(None if g is None else g.clamp(min=0) for g in gi))
        stack.extend(n for n, _ in node.next_functions)
    (gx,) = torch.autograd.grad(sel, x)
    return gx * F.interpolate(cam.detach(), size=x.shape[2:], mode="nearest")


def build(a):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def peer(a):
    """One Python variant in this (fresh) process; prints a JSON line."""
    from captum.attr import GuidedGradCam

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = build(a)
    for m in model.modules():  # Captum needs out-of-place ReLU modules
        if isinstance(m, nn.ReLU):
            m.inplace = False
    model.to(dev)
    layer = resolve_layer(model, LAYERS[a.model])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g).to(dev)
    tgt = torch.tensor([(i * 7919) % 1000 for i in range(a.batch)], device=dev)
    if a.variant == "captum":
        ggc = GuidedGradCam(model, layer)
        fn = lambda: ggc.attribute(x, target=tgt.tolist())  # noqa: E731
    elif a.variant == "lean":
        fn = lambda: lean(model, layer, x, tgt)  # noqa: E731
    else:  # lean_fast: bf16 autocast and channels-last, as the anchors' fast peer
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        fn = lambda: lean(model, layer, x, tgt, bf16=True)  # noqa: E731
    t, peak = timed(fn, dev, a.warmup, a.iters)
    print(json.dumps({"s_per_batch": t, "peak_rss_delta_bytes": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/saliency-audit"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--fast", action="store_true",
                    help="also the bf16 + channels-last peer and engine, and the engine's bf16 error against fp32")
    ap.add_argument("--variant", choices=["captum", "lean", "lean_fast"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        return peer(a)
    import warnings

    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="sa-bench-")
    pt = os.path.join(tmp, f"{a.model}.pt")
    export(build(a), LAYERS[a.model], False, torch.randn(2, 3, a.size, a.size), {"architecture": a.model}, pt)
    common = ["--model", a.model, "--batch", str(a.batch), "--size", str(a.size), "--threads", str(a.threads),
              "--iters", str(a.iters), "--warmup", str(a.warmup), "--device", a.device]
    rows = []
    # Every variant in a fresh process, timed and measured the same way: median time per batch
    # after warm-up; peak resident memory above the process's memory after loading the model.
    variants = [("captum GuidedGradCam", "captum"), ("lean one-forward PyTorch", "lean")]
    if a.fast:
        variants.append(("lean bf16 channels-last", "lean_fast"))
    for name, variant in variants:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant] + common,
                             check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, r["s_per_batch"], r["peak_rss_delta_bytes"]))
    engines = [("saliency-audit engine", [])]
    if a.fast:
        engines.append(("engine bf16 channels-last", ["--precision", "bf16", "--channels-last"]))
    for name, extra in engines:
        out = subprocess.run([a.bin, "-q", "bench", "--model", pt, "--batch-size", str(a.batch), "--iters",
                              str(a.iters), "--warmup", str(a.warmup), "--devices", a.device, "--threads",
                              str(a.threads), "--json"] + extra, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout)
        rows.append((name, r["s_per_batch"], r["peak_rss_delta_bytes"]))
    fast_err = bf16_error(a, pt, tmp) if a.fast else None
    captum = rows[0][1]
    dev = torch.device(a.device)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"{a.model}, batch {a.batch}, {a.size}x{a.size}, {a.threads} threads, {dev_name}, torch {torch.__version__}")
    print(f"{'variant':28s} {'ms/batch':>10s} {'images/s':>10s} {'vs Captum':>10s} {'peak MiB':>10s}")
    res = []
    for name, t, peak in rows:
        mib = f"{peak / 1048576:.0f}" if peak is not None else "-"
        print(f"{name:28s} {t * 1e3:10.1f} {a.batch / t:10.2f} {captum / t:9.2f}x {mib:>10s}")
        res.append({"variant": name, "s_per_batch": t, "images_per_s": a.batch / t, "vs_captum": captum / t,
                    "peak_rss_delta_bytes": peak})
    if fast_err is not None:
        print(f"engine bf16 vs fp32 on {fast_err[0]} random inputs: relative L2 error {fast_err[1]:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "size": a.size, "threads": a.threads, "device": dev_name,
                       "rows": res, "bf16_rel_l2": None if fast_err is None else fast_err[1]}, f, indent=1)


def bf16_error(a, pt, tmp, n=16):
    """The engine's fast mode against its exact mode (= Captum) on the same inputs."""
    import numpy as np

    g = torch.Generator().manual_seed(1)
    np.save(os.path.join(tmp, "x.npy"), torch.randn(n, 3, a.size, a.size, generator=g).numpy())
    np.save(os.path.join(tmp, "t.npy"), np.array([(i * 7919) % 1000 for i in range(n)], dtype=np.int64))
    res = {}
    for mode, extra in [("fp32", []), ("bf16", ["--precision", "bf16", "--channels-last"])]:
        o = os.path.join(tmp, f"attr_{mode}.npy")
        subprocess.run([a.bin, "-q", "attribute", "--model", pt, "--input", os.path.join(tmp, "x.npy"), "--target",
                        os.path.join(tmp, "t.npy"), "--out", o, "--device", a.device, "--batch-size", "8"] + extra,
                       check=True, capture_output=True, text=True)
        res[mode] = np.load(o).astype(np.float64)
    return n, float(np.linalg.norm(res["bf16"] - res["fp32"]) / np.linalg.norm(res["fp32"]))


if __name__ == "__main__":
    main()
