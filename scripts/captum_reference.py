#!/usr/bin/env python3
"""What PIL, torchvision and Captum make of each sample of a CSV manifest: the reference a
saliency-audit run over the same files must equal (the tests' end-to-end check, and a check of
a run on your own model).

Usage, the tests' model (make_engine_cases.py's pipeline model: SmallNet, Grad-CAM layer conv3,
mean/std as below, resize 36, input 32):
    python scripts/captum_reference.py MANIFEST.csv WEIGHTS.pth OUT.json [--gray]
        [--region NAME:X0,Y0,X1,Y1 ...]
Your own model: the exported file (its metadata gives the layer, mean/std, resize, input size and
class names) and the eager model it was exported from, as export_model.py builds it:
    python scripts/captum_reference.py MANIFEST.csv WEIGHTS.pth OUT.json --model MODEL.pt
        (--arch NAME [--num-classes N] | --factory MODULE:FUNCTION [--factory-kwargs JSON])
        [--region ...] [--map-size 64] [--interpolate-mode nearest] [--compare OUTPUT_DIR]
With --compare, the rows of a run's output folder over the same manifest are checked against the
reference, statistic by statistic (the tests' tolerances), and the worst differences printed;
exit 1 when one is over its tolerance. The eager model runs with batch norm as it is: a run of an
export with batch norm folded differs by float rounding, which guided backprop amplifies (see
export_model.py); export with --no-fold-batchnorm to compare at the tests' tolerances.

For each row (path, label (an id or a class name), id, optional bbox_x0..bbox_y1 and mask): the
image as torchvision's eval transform makes it (exif_transpose, convert("RGB"), Resize bilinear
antialiased, CenterCrop, with --gray Grayscale for the 1-channel twin of the model, ToTensor,
Normalize), Captum's GuidedGradCam and LayerGradCam (relu_attributions) for the label, the
statistics saliency-audit defines on them (README, "Output"; the box mapped through the resize
and crop, the mask resized by PIL's NEAREST and cropped the same way, regions as fractions of
the input), the map area-averaged to --map-size and the CAM, written as JSON keyed by id.
"""
import csv
import json
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_model import META_FILE, build_model, resolve_layer  # noqa: E402
from make_engine_cases import SmallNet  # noqa: E402

# The tests' pipeline model.
MEAN, STD, RESIZE, CROP = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3], 36, 32
# --compare's tolerances: relative for totals and maxima, absolute for shares and centres.
RELATIVE = {"attr_total": 1e-4, "attr_max": 1e-4, "cam_max": 1e-4}
ABSOLUTE = 1e-5


def centre_of_mass(m):
    """The mass-weighted mean of pixel centres of m, as fractions of its width and height."""
    h, w = m.shape
    ys, xs = np.mgrid[0:h, 0:w]
    total = m.sum()
    return float((m * (xs + 0.5) / w).sum() / total), float((m * (ys + 0.5) / h).sum() / total)


def share(m, inside):
    """The share of m's mass where the boolean array `inside` holds."""
    return float(m[inside].sum() / m.sum())


def centres_in(h, w, x0, y0, x1, y1):
    """Pixels of an h x w frame whose centre lies in [x0, x1) x [y0, y1) (fractions of the frame)."""
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = (xs + 0.5) / w, (ys + 0.5) / h
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def stats(m, cam):
    """attr_* of the map m (h x w, channels reduced by absolute value), cam_max, cam_com_x/y."""
    h, w = m.shape
    total = float(m.sum())
    out = {"attr_total": total, "attr_max": float(m.max()), "cam_max": float(cam.max())}
    if cam.sum() > 0:
        out["cam_com_x"], out["cam_com_y"] = centre_of_mass(cam)
    if total > 0:
        p = m.flatten() / total
        nz = p[p > 0]
        out["attr_entropy"] = float(-(nz * np.log(nz)).sum() / np.log(m.size))
        srt = np.sort(m.flatten())
        n = srt.size
        i = np.arange(1, n + 1)
        out["attr_gini"] = float(((2 * i - n - 1) * srt).sum() / (n * total))
        top = -(-n // 20)  # ceil(n / 20)
        out["attr_top5_share"] = float(srt[n - top:].sum() / total)
        out["attr_com_x"], out["attr_com_y"] = centre_of_mass(m)
        peak = int(np.argmax(m))  # the first maximum in row-major order
        out["attr_peak_x"], out["attr_peak_y"] = (peak % w + 0.5) / w, (peak // w + 0.5) / h
    return out


def parse_args():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("weights", help="the eager model's state_dict")
    ap.add_argument("out", help="the reference, as JSON keyed by sample id")
    ap.add_argument("--gray", action="store_true", help="the tests' 1-channel model")
    ap.add_argument("--region", action="append", default=[], metavar="NAME:X0,Y0,X1,Y1")
    ap.add_argument("--model", help="the exported model: its metadata gives the layer and preprocessing")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--arch", help="torchvision architecture of the eager model")
    src.add_argument("--factory", help="module:function returning the eager model")
    ap.add_argument("--factory-kwargs")
    ap.add_argument("--num-classes", type=int)
    ap.add_argument("--map-size", type=int, default=16, help="the job's output.map_size")
    ap.add_argument("--interpolate-mode", default="nearest", help="the job's attribution.interpolate_mode")
    ap.add_argument("--compare", metavar="OUTPUT_DIR", help="check a run's rows against the reference")
    a = ap.parse_args()
    if a.model and not (a.arch or a.factory):
        ap.error("--model needs the eager model it was exported from: --arch or --factory")
    return a


def setup(a):
    """The eager model, its Grad-CAM layer and whether to attribute to its input, mean, std,
    resize (shorter side) and crop (h, w), and the class names."""
    if not a.model:
        model = SmallNet(channels=1 if a.gray else 3, classes=3).eval()
        model.load_state_dict(torch.load(a.weights))
        mean, std = ([0.5], [0.25]) if a.gray else (MEAN, STD)
        return model, model.conv3, False, mean, std, RESIZE, (CROP, CROP), None
    extra = {META_FILE: ""}
    torch.jit.load(a.model, map_location="cpu", _extra_files=extra)
    meta = json.loads(extra[META_FILE] or "{}")
    if "layer" not in meta or "input_size" not in meta:
        raise SystemExit(f"error: {a.model} has no saliency-audit metadata (export it with scripts/export_model.py)")
    model = build_model(a)
    h, w = meta["input_size"]
    resize = meta.get("resize", min(h, w))
    return (model, resolve_layer(model, meta["layer"]), bool(meta.get("layer_input")), meta["mean"], meta["std"],
            resize, (h, w), meta.get("class_names"))


def main():
    import warnings

    warnings.filterwarnings("ignore")  # Captum's notes on its hooks, for every sample
    a = parse_args()
    regions = {}
    for spec in a.region:
        name, coords = spec.split(":")
        regions[name] = [float(v) for v in coords.split(",")]
    from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam

    model, layer, layer_input, mean, std, resize, (ch, cw), class_names = setup(a)
    base = os.path.dirname(os.path.abspath(a.manifest))
    result = {}
    with open(a.manifest, newline="") as f:
        for row in csv.DictReader(f):
            im = ImageOps.exif_transpose(Image.open(os.path.join(base, row["path"]))).convert("RGB")
            x = TF.resize(im, resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            # Where the crop's window lies in the resized image (torchvision's offsets).
            (ow, oh), (rw, rh) = im.size, x.size
            left, top = int(round((rw - cw) / 2.0)), int(round((rh - ch) / 2.0))
            x = TF.center_crop(x, [ch, cw])
            if a.gray:
                x = TF.to_grayscale(x)
            x = TF.normalize(TF.to_tensor(x), mean, std)[None]
            label = row["label"]
            target = class_names.index(label) if class_names and label in class_names else int(label)
            with torch.no_grad():
                probs = torch.softmax(model(x), 1)[0]
            attr = GuidedGradCam(model, layer).attribute(x, target=target, interpolate_mode=a.interpolate_mode,
                                                         attribute_to_layer_input=layer_input)
            cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True,
                                                       attribute_to_layer_input=layer_input)
            m = attr.detach().abs().sum(1)[0].double().numpy()
            r = stats(m, cam.detach()[0, 0].double().numpy())
            r["predicted_prob"] = float(probs.max())
            if m.sum() > 0:
                if row.get("bbox_x0"):
                    b = [float(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
                    fx = lambda v: min(max((v * rw / ow - left) / cw, 0.0), 1.0)  # noqa: E731
                    fy = lambda v: min(max((v * rh / oh - top) / ch, 0.0), 1.0)  # noqa: E731
                    r["bbox_mass_share"] = share(m, centres_in(ch, cw, fx(b[0]), fy(b[1]), fx(b[2]), fy(b[3])))
                if row.get("mask"):
                    # An object pixel: any colour channel non-zero.
                    mask = Image.open(os.path.join(base, row["mask"])).convert("RGB")
                    mask = TF.resize(mask, resize, interpolation=TF.InterpolationMode.NEAREST)
                    r["mask_mass_share"] = share(m, np.asarray(TF.center_crop(mask, [ch, cw])).any(axis=2))
                for name, (x0, y0, x1, y1) in regions.items():
                    r[f"region_{name}_share"] = share(m, centres_in(ch, cw, x0, y0, x1, y1))
            # The stored map: area-averaged to map_size (adaptive average pooling), and the CAM.
            small = torch.nn.functional.adaptive_avg_pool2d(attr.detach().abs().sum(1, keepdim=True), a.map_size)
            r["map"] = small[0, 0].flatten().tolist()
            r["cam"] = cam.detach()[0, 0].flatten().tolist()
            r["predicted"] = int(probs.argmax())
            r["target_prob"] = float(probs[target])
            result[row.get("id") or row["path"]] = r
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    if a.compare:
        sys.exit(compare(result, a.compare))


def compare(reference, out_dir):
    """Prints, per statistic, the worst difference of a run's ok rows from the reference and the
    tolerance; returns 1 when one is over it (or a sample is missing or failed), else 0."""
    import pyarrow.dataset as ds

    rows = {r["id"]: r for r in ds.dataset(out_dir, format="parquet").to_table().to_pylist()}
    bad, worst = [], {}
    for sid, want in reference.items():
        got = rows.get(sid)
        if got is None or got["status"] != "ok":
            bad.append(f"{sid}: {'no row' if got is None else got['status']}")
            continue
        for k, v in want.items():
            if not isinstance(v, float) or k not in got or got[k] is None:
                continue
            diff = abs(got[k] - v) / max(abs(v), 1e-12) if k in RELATIVE else abs(got[k] - v)
            if diff > worst.get(k, (-1.0,))[0]:
                worst[k] = (diff, sid)
    print(f"{'statistic':24s} {'worst difference':>17s} {'tolerance':>10s}  sample")
    over = False
    for k, (diff, sid) in sorted(worst.items()):
        tol = RELATIVE.get(k, ABSOLUTE)
        kind = "relative" if k in RELATIVE else "absolute"
        over |= diff > tol
        print(f"{k:24s} {diff:17.3e} {tol:10.0e}  {sid} ({kind}){'  OVER' if diff > tol else ''}")
    for b in bad:
        print(f"not compared: {b}")
    return 1 if over or bad else 0


if __name__ == "__main__":
    main()
