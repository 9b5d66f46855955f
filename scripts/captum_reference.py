#!/usr/bin/env python3
"""The end-to-end reference for a run over image files: what PIL, torchvision and Captum make of
each sample of a CSV manifest, for the pipeline test model (make_engine_cases.py's pipeline
model: SmallNet, Grad-CAM layer conv3, metadata mean/std, resize 36, input 32).

Usage: python scripts/captum_reference.py MANIFEST.csv MODEL_EAGER.pth OUT.json [--gray]
           [--region NAME:X0,Y0,X1,Y1 ...]
For each row (path, label, id, optional bbox_x0..bbox_y1 and mask): the image as torchvision's
eval transform makes it (exif_transpose, convert("RGB"), Resize(36) bilinear antialiased,
CenterCrop(32), with --gray Grayscale for the 1-channel twin of the model, ToTensor, Normalize),
Captum's GuidedGradCam and LayerGradCam (relu_attributions) for the label, the statistics
saliency-audit defines on them (README, "Output"; the box mapped through the resize and crop,
the mask resized by PIL's NEAREST and cropped the same way, regions as fractions of the input),
the map area-averaged to 16x16 and the CAM, written as JSON keyed by id.
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
from make_engine_cases import SmallNet  # noqa: E402

MEAN, STD, RESIZE, CROP = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3], 36, 32


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


def main():
    manifest, weights, out = sys.argv[1:4]
    gray = "--gray" in sys.argv[4:]
    regions = {}
    for i, a in enumerate(sys.argv):
        if a == "--region":
            name, coords = sys.argv[i + 1].split(":")
            regions[name] = [float(v) for v in coords.split(",")]
    mean, std = ([0.5], [0.25]) if gray else (MEAN, STD)
    from captum.attr import GuidedGradCam, LayerGradCam

    model = SmallNet(channels=1 if gray else 3, classes=3).eval()
    model.load_state_dict(torch.load(weights))
    base = os.path.dirname(os.path.abspath(manifest))
    result = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            im = ImageOps.exif_transpose(Image.open(os.path.join(base, row["path"]))).convert("RGB")
            x = TF.resize(im, RESIZE, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            # Where the crop's window lies in the resized image (torchvision's offsets).
            (ow, oh), (rw, rh) = im.size, x.size
            left, top = int(round((rw - CROP) / 2.0)), int(round((rh - CROP) / 2.0))
            x = TF.center_crop(x, CROP)
            if gray:
                x = TF.to_grayscale(x)
            x = TF.normalize(TF.to_tensor(x), mean, std)[None]
            target = int(row["label"])
            with torch.no_grad():
                probs = torch.softmax(model(x), 1)[0]
            attr = GuidedGradCam(model, model.conv3).attribute(x, target=target)
            cam = LayerGradCam(model, model.conv3).attribute(x, target=target, relu_attributions=True)
            m = attr.detach().abs().sum(1)[0].double().numpy()
            r = stats(m, cam.detach()[0, 0].double().numpy())
            r["predicted_prob"] = float(probs.max())
            if m.sum() > 0:
                if row.get("bbox_x0"):
                    b = [float(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
                    fx = lambda v: min(max((v * rw / ow - left) / CROP, 0.0), 1.0)  # noqa: E731
                    fy = lambda v: min(max((v * rh / oh - top) / CROP, 0.0), 1.0)  # noqa: E731
                    r["bbox_mass_share"] = share(m, centres_in(CROP, CROP, fx(b[0]), fy(b[1]), fx(b[2]), fy(b[3])))
                if row.get("mask"):
                    # An object pixel: any colour channel non-zero.
                    mask = Image.open(os.path.join(base, row["mask"])).convert("RGB")
                    mask = TF.center_crop(TF.resize(mask, RESIZE, interpolation=TF.InterpolationMode.NEAREST), CROP)
                    r["mask_mass_share"] = share(m, np.asarray(mask).any(axis=2))
                for name, (x0, y0, x1, y1) in regions.items():
                    r[f"region_{name}_share"] = share(m, centres_in(CROP, CROP, x0, y0, x1, y1))
            # The stored map: area-averaged to the test job's map_size (16: 2x2 means), and the CAM.
            r["map16"] = torch.nn.functional.avg_pool2d(attr.detach().abs().sum(1, keepdim=True), 2)[0, 0].flatten().tolist()
            r["cam"] = cam.detach()[0, 0].flatten().tolist()
            r["predicted"] = int(probs.argmax())
            r["target_prob"] = float(probs[target])
            result[row["id"]] = r
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
