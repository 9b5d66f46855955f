#!/usr/bin/env python3
"""The end-to-end reference for a run over image files: what PIL, torchvision and Captum make of
each sample of a CSV manifest, for the pipeline test model (make_engine_cases.py's pipeline
model: SmallNet, Grad-CAM layer conv3, metadata mean/std, resize 36, input 32).

Usage: python scripts/captum_reference.py MANIFEST.csv MODEL_EAGER.pth OUT.json [--gray]
For each row (path, label, id): the image as torchvision's eval transform makes it
(exif_transpose, convert("RGB"), Resize(36) bilinear antialiased, CenterCrop(32), with --gray
Grayscale for the 1-channel twin of the model, ToTensor, Normalize), Captum's GuidedGradCam and LayerGradCam (relu_attributions) for the label, the
statistics saliency-audit defines on them (README, "Output"), the map area-averaged to 16x16 and
the CAM, written as JSON keyed by id.
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


def stats(m, cam):
    """attr_* of the map m (h x w, channels reduced by absolute value) and cam_max."""
    h, w = m.shape
    total = float(m.sum())
    out = {"attr_total": total, "attr_max": float(m.max()), "cam_max": float(cam.max())}
    if total > 0:
        p = m.flatten() / total
        nz = p[p > 0]
        out["attr_entropy"] = float(-(nz * np.log(nz)).sum() / np.log(m.size))
        srt = np.sort(m.flatten())
        n = srt.size
        i = np.arange(1, n + 1)
        out["attr_gini"] = float(((2 * i - n - 1) * srt).sum() / (n * total))
        ys, xs = np.mgrid[0:h, 0:w]
        out["attr_com_x"] = float((m * (xs + 0.5) / w).sum() / total)
        out["attr_com_y"] = float((m * (ys + 0.5) / h).sum() / total)
    return out


def main():
    manifest, weights, out = sys.argv[1:4]
    gray = "--gray" in sys.argv[4:]
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
