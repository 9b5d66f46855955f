#!/usr/bin/env python3
"""Engine vs Captum, same model, batch, input size and thread count, in one run.

Exports a randomly initialised torchvision model with scripts/export_model.py, times Captum's
GuidedGradCam on the eager model in this process (and, as a second peer, a lean one-forward
PyTorch version; on CUDA a third, Captum with cuDNN's benchmark mode on as the engine has it),
runs `saliency-audit bench` on the export in a subprocess, and prints a table
with images/s, peak memory above the loaded model (host memory on the CPU; the caching
allocator's peak for the Python peers on CUDA), and the ratios. The export folds batch norm into
the convolutions (see export_model.py); the peers run the model as torchvision builds it, as a
Captum user would. --unfolded adds the engine without that folding; --ablation the other fp32
memory layout and, on CUDA, full IEEE float32 (no TF32) with its error against Captum's, and
cuDNN benchmark mode off.

Usage: .venv/bin/python benches/engine_vs_captum.py [--model resnet18] [--batch 8] [--size 224]
       [--threads 2] [--iters 6] [--device cpu] [--bin target/release/saliency-audit] [--fast]
       [--ablation] [--unfolded] [--skip-lean] [--json out.json]
"""
import argparse
import atexit
import json
import os
import shutil
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
from export_model import META_FILE, export, resolve_layer  # noqa: E402

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
    peak = rss("VmHWM:") - base if dev.type == "cpu" else None  # CUDA: the caller reads the allocator
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


def peer_model(a, dev):
    """The eager model the Python peers run, on `dev`: Captum needs out-of-place ReLU modules."""
    model = build(a)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model.to(dev)


def peer(a):
    """One Python variant in this (fresh) process; prints a JSON line."""
    from captum.attr import GuidedGradCam

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = peer_model(a, dev)
    layer = resolve_layer(model, LAYERS[a.model])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g).to(dev)
    tgt = torch.tensor([(i * 7919) % 1000 for i in range(a.batch)], device=dev)
    if a.variant in ("captum", "captum_benchmark"):
        # As the anchors' peer calls it (targets as a list). captum_benchmark: the same with
        # cuDNN's benchmark mode on, as the engine has it, the one line a Captum user could add.
        torch.backends.cudnn.benchmark = a.variant == "captum_benchmark"
        ggc = GuidedGradCam(model, layer)
        fn = lambda: ggc.attribute(x, target=tgt.tolist())  # noqa: E731
    elif a.variant == "lean":
        fn = lambda: lean(model, layer, x, tgt)  # noqa: E731
    else:  # lean_fast: bf16 autocast and channels-last, as the anchors' fast peer
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        fn = lambda: lean(model, layer, x, tgt, bf16=True)  # noqa: E731
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t, peak = timed(fn, dev, a.warmup, a.iters)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
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
    ap.add_argument("--ablation", action="store_true",
                    help="also the engine with the other fp32 memory layout and, on CUDA, without TF32 (and its error)")
    ap.add_argument("--unfolded", action="store_true",
                    help="also the engine on an export without batch norm folded into the convolutions")
    ap.add_argument("--skip-lean", action="store_true", help="leave out the lean PyTorch peers")
    ap.add_argument("--variant", choices=["captum", "captum_benchmark", "lean", "lean_fast"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        return peer(a)
    import warnings

    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="sa-bench-")
    # The exported model, inputs and outputs (about 100 MB): removed however the script ends,
    # short of being killed.
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    pt = os.path.join(tmp, f"{a.model}.pt")
    export(build(a), LAYERS[a.model], False, torch.randn(2, 3, a.size, a.size), {"architecture": a.model}, pt)
    common = ["--model", a.model, "--batch", str(a.batch), "--size", str(a.size), "--threads", str(a.threads),
              "--iters", str(a.iters), "--warmup", str(a.warmup), "--device", a.device]
    rows = []
    dev = torch.device(a.device)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    try:
        import captum
        captum_version = captum.__version__
    except ImportError:
        captum_version = "not installed"
    print(f"{a.model}, batch {a.batch}, {a.size}x{a.size}, {a.threads} threads, {dev_name}, torch {torch.__version__}, "
          f"captum {captum_version}")
    print("Captum and the lean peers: eager torchvision model (batch norm not folded), NCHW, PyTorch's cuDNN "
          "defaults; the engine: its export (batch norm folded), channels-last on CUDA, cuDNN benchmark on")
    print(f"{'variant':28s} {'ms/batch':>10s} {'images/s':>10s} {'vs Captum':>10s} {'peak MiB':>10s}")

    def add_row(name, r):
        # Each row as soon as it is measured: a step cut short by its time limit keeps them.
        if r is None:
            print(f"{name:28s} {'failed':>10s}")
            return
        t, peak = r["s_per_batch"], r["peak_rss_delta_bytes"]
        rows.append((name, t, peak))
        mib = f"{peak / 1048576:.0f}" if peak is not None else "-"
        vs = f"{rows[0][1] / t:9.2f}x" if rows[0][0] == "captum GuidedGradCam" else f"{'-':>10s}"
        print(f"{name:28s} {t * 1e3:10.1f} {a.batch / t:10.2f} {vs} {mib:>10s}", flush=True)

    # Every variant in a fresh process, timed and measured the same way: median time per batch
    # after warm-up; peak resident memory above the process's memory after loading the model.
    # What the targets need first (Captum, the engine in both modes, the errors), so that
    # a run cut short by its time limit has them; the other peers and variants after.
    cuda = a.device.startswith("cuda")

    def python_peer(name, variant):
        out = run_cmd(name, [sys.executable, os.path.abspath(__file__), "--variant", variant] + common,
                      env=dict(os.environ, PYTHONWARNINGS="ignore"))
        add_row(name, json.loads(out.strip().splitlines()[-1]) if out else None)

    def engine(name, extra, model_file):
        out = run_cmd(name, [a.bin, "-q", "bench", "--model", model_file, "--batch-size", str(a.batch), "--iters",
                             str(a.iters), "--warmup", str(a.warmup), "--devices", a.device, "--threads",
                             str(a.threads), "--json"] + extra)
        add_row(name, json.loads(out) if out else None)

    python_peer("captum GuidedGradCam", "captum")
    engine("saliency-audit engine", [], pt)
    if a.fast:
        engine("engine bf16", ["--precision", "bf16"], pt)
    unfolded = None
    if a.unfolded and meta_of(pt).get("folded_batchnorm"):
        unfolded = os.path.join(tmp, f"{a.model}-bn.pt")
        export(build(a), LAYERS[a.model], False, torch.randn(2, 3, a.size, a.size), {"architecture": a.model},
               unfolded, fold_bn=False)
    errors = accuracy(a, pt, tmp, ieee=a.ablation and cuda, unfolded=unfolded) if a.fast else {}
    for what, err in errors.items():
        print(f"relative L2 error, {what}: {err:.2e}", flush=True)
    if cuda or a.ablation:  # the flag has no effect on the CPU: there only to test the row
        python_peer("captum, cuDNN benchmark on", "captum_benchmark")
    if not a.skip_lean:
        python_peer("lean one-forward PyTorch", "lean")
        if a.fast:
            python_peer("lean bf16 channels-last", "lean_fast")
    engines = []
    if a.ablation:
        # The layout default flipped: channels-last is on for CUDA, off for fp32 on the CPU.
        engines.append(("engine fp32 NCHW", ["--channels-last", "false"], pt) if cuda
                       else ("engine fp32 channels-last", ["--channels-last"], pt))
        if cuda:
            engines.append(("engine fp32 IEEE (no TF32)", ["--ieee-fp32"], pt))
            engines.append(("engine fp32, cuDNN benchmark off", ["--no-cudnn-benchmark"], pt))
    if unfolded:
        engines.append(("engine fp32, BN not folded", [], unfolded))
        engines.append(("engine bf16, BN not folded", ["--precision", "bf16"], unfolded))
    for name, extra, model_file in engines:
        engine(name, extra, model_file)
    tuned = next((t for name, t, _ in rows if name == "captum, cuDNN benchmark on"), None)
    if tuned:
        for name, t, _ in rows:
            if name.startswith(("saliency-audit engine", "engine bf16")):
                print(f"{name} vs Captum with cuDNN benchmark on: {tuned / t:.2f}x", flush=True)
    captum = rows[0][1] if rows and rows[0][0] == "captum GuidedGradCam" else None
    res = [{"variant": name, "s_per_batch": t, "images_per_s": a.batch / t,
            "vs_captum": captum / t if captum else None, "vs_captum_cudnn_benchmark": tuned / t if tuned else None,
            "peak_rss_delta_bytes": peak} for name, t, peak in rows]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "size": a.size, "threads": a.threads, "device": dev_name,
                       "rows": res, "rel_l2_errors": errors, "failed": FAILED}, f, indent=1)
    if FAILED:
        sys.exit(1)


FAILED = []


def run_cmd(name, cmd, env=None):
    """Runs cmd; its stdout, or None after printing why it failed (its stderr's end), so that
    one failing variant does not take the others' rows with it."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(f"{name}: exit {r.returncode}: {r.stderr.strip()[-1500:]}", flush=True)
        FAILED.append(name)
        return None
    return r.stdout


def captum_attr(a, x, t, ieee):
    """Captum's GuidedGradCam on the eager model as torchvision builds it (BN not folded), with
    PyTorch's default TF32 convolutions on CUDA or (ieee) without."""
    from captum.attr import GuidedGradCam

    dev = torch.device(a.device)
    torch.backends.cudnn.allow_tf32 = not ieee
    model = peer_model(a, dev)
    ggc = GuidedGradCam(model, resolve_layer(model, LAYERS[a.model]))
    x = torch.from_numpy(x).to(dev)
    out = torch.cat([ggc.attribute(x[i:i + 8], target=t[i:i + 8]) for i in range(0, len(t), 8)])
    torch.backends.cudnn.allow_tf32 = True
    return out.detach().cpu().double().numpy()


def accuracy(a, pt, tmp, ieee, unfolded=None, n=16):
    """Relative L2 errors on the same n random inputs: the engine's bf16 mode against its fp32
    mode, the engine's fp32 mode against Captum (and, given the export without batch norm
    folded, that one's), and with ieee (CUDA) the same without TF32 and TF32's own effect on
    Captum."""
    import numpy as np

    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, a.size, a.size, generator=g).numpy()
    t = [(i * 7919) % 1000 for i in range(n)]
    np.save(os.path.join(tmp, "x.npy"), x)
    np.save(os.path.join(tmp, "t.npy"), np.array(t, dtype=np.int64))
    modes = [("fp32", [], pt), ("bf16", ["--precision", "bf16"], pt)]
    modes += [("ieee", ["--ieee-fp32"], pt)] if ieee else []
    modes += [("unfolded", [], unfolded)] if unfolded else []
    eng = {}
    for mode, extra, model_file in modes:
        o = os.path.join(tmp, f"attr_{mode}.npy")
        if run_cmd(f"attribute ({mode})", [a.bin, "-q", "attribute", "--model", model_file, "--input",
                                            os.path.join(tmp, "x.npy"), "--target", os.path.join(tmp, "t.npy"),
                                            "--out", o, "--device", a.device, "--batch-size", "8"] + extra) is None:
            return {}
        eng[mode] = np.load(o).astype(np.float64)

    def rel(u, v):
        return float(np.linalg.norm(u - v) / np.linalg.norm(v))

    ref = captum_attr(a, x, t, ieee=False)
    errors = {"engine bf16 vs engine fp32": rel(eng["bf16"], eng["fp32"]),
              f"engine fp32 vs Captum ({a.device} defaults)": rel(eng["fp32"], ref)}
    if unfolded:
        errors[f"engine fp32, BN not folded, vs Captum ({a.device} defaults)"] = rel(eng["unfolded"], ref)
    if ieee:
        ref_ieee = captum_attr(a, x, t, ieee=True)
        errors["engine fp32 IEEE vs Captum IEEE (no TF32 on either side)"] = rel(eng["ieee"], ref_ieee)
        errors["Captum with TF32 vs Captum IEEE (TF32's own effect)"] = rel(ref, ref_ieee)
    # Captum ran in this process: its cached device memory goes back before the later peers
    # (each in its own process) are timed.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return errors


def meta_of(pt):
    extra = {META_FILE: ""}
    torch.jit.load(pt, _extra_files=extra)
    return json.loads(extra[META_FILE] or "{}")


if __name__ == "__main__":
    main()
