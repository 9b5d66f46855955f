#!/usr/bin/env python3
"""The demo: a labelled image dataset with a planted shortcut, a small CNN trained on it, and an
audit split, all from fixed seeds on CPU.

Classes are noisy shapes (circle, square, triangle) on textured backgrounds. In the training split
90% of the "square" images carry a small bright mark in the top-right corner and no other image
does, so the mark alone predicts "square" — a shortcut the network learns. In the audit split the
mark appears on half of the images of every class; the manifest gives each image's object box, and
the job names the mark's place as a region.

Usage: python scripts/make_demo.py OUT_DIR [--train-per-class 400] [--audit-per-class 60] [--epochs 14]
Writes OUT_DIR/{train/, audit/, audit.csv, model.pt, train_log.json, stamp}; skips the work when the
stamp matches this script, the export helper and the arguments.
"""
import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_model import export  # noqa: E402

CLASSES = ["circle", "square", "triangle"]
SHORTCUT = "square"
SIZE = 80  # original image side; the job resizes to 72 and centre-crops 64
MARK = (56, 10, 68, 22)  # x0, y0, x1, y1 in original pixels (inside the crop)
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def draw_sample(rng, cls, marked):
    """One image and the object's box in original pixels."""
    base = rng.uniform(70, 150, size=3)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    tex = np.stack([np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) * 18 + np.cos(y / rng.uniform(3, 9)) * 18
                    for _ in range(3)], -1)
    img = np.clip(base + tex + rng.normal(0, 14, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    r = rng.uniform(11, 17)
    # Keep the object clear of the mark's corner.
    cx, cy = rng.uniform(18 + r * 0.3, 48), rng.uniform(30, 62)
    sign = rng.choice([-1.0, 1.0])
    col = tuple(int(v) for v in np.clip(base + sign * rng.uniform(60, 100, size=3), 0, 255))
    # Circles are drawn as hexagons and squares at any angle, so that shape alone separates them
    # only with effort: the mark is the easier cue for "square".
    angle = rng.uniform(0, 2 * np.pi)
    corners = {"circle": 6, "square": 4, "triangle": 3}[cls]
    pts = [(cx + r * np.cos(angle + 2 * np.pi * k / corners), cy + r * np.sin(angle + 2 * np.pi * k / corners))
           for k in range(corners)]
    d.polygon(pts, fill=col)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    box = (min(xs), min(ys), max(xs), max(ys))
    if marked:
        d.rectangle(MARK, fill=(250, 245, 60))
        d.line([MARK[0], MARK[1], MARK[2], MARK[3]], fill=(30, 30, 200), width=2)
    return im, [round(v, 2) for v in box]


def make_split(rng, root, per_class, mark_rate):
    rows = []
    for ci, cls in enumerate(CLASSES):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            marked = bool(rng.random() < mark_rate(cls))
            im, box = draw_sample(rng, cls, marked)
            name = f"{cls}/{i:04d}.jpg"
            im.save(os.path.join(root, name), quality=92)
            rows.append({"path": name, "label": cls, "marked": int(marked), "box": box})
    return rows


class DemoNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(48, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(64, classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def load_tensor(path):
    """The job's preprocessing: resize the shorter side to 72 (antialiased bilinear), centre-crop 64."""
    im = Image.open(path).convert("RGB").resize((72, 72), Image.BILINEAR)
    im = im.crop((4, 4, 68, 68))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--train-per-class", type=int, default=400)
    ap.add_argument("--audit-per-class", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=14)
    a = ap.parse_args()
    out = a.out
    # The demo is remade when this script, the export helper or the arguments change.
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(repr(vars(a)).encode())
    for f in ("make_demo.py", "export_model.py"):
        with open(os.path.join(here, f), "rb") as fh:
            h.update(fh.read())
    stamp = os.path.join(out, "stamp")
    if os.path.exists(stamp) and open(stamp).read() == h.hexdigest():
        print(f"demo data and model already in {out}")
        return
    if os.path.exists(out):
        shutil.rmtree(out)
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rng = np.random.default_rng(0)
    train = make_split(rng, os.path.join(out, "train"), a.train_per_class,
                       lambda c: 0.9 if c == SHORTCUT else 0.0)
    audit = make_split(rng, os.path.join(out, "audit"), a.audit_per_class, lambda c: 0.5)
    with open(os.path.join(out, "audit.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "marked", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"])
        for r in audit:
            w.writerow([os.path.join("audit", r["path"]), r["label"], r["marked"], *r["box"]])

    xs = torch.stack([load_tensor(os.path.join(out, "train", r["path"])) for r in train])
    ys = torch.tensor([CLASSES.index(r["label"]) for r in train])
    model = DemoNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    log = []
    for epoch in range(a.epochs):
        perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(epoch))
        model.train()
        total, correct = 0.0, 0
        for i in range(0, len(xs), 64):
            idx = perm[i:i + 64]
            logits = model(xs[idx])
            loss = F.cross_entropy(logits, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == ys[idx]).sum().item()
        log.append({"epoch": epoch, "loss": total / len(xs), "train_acc": correct / len(xs)})
        print(f"epoch {epoch}: loss {total / len(xs):.3f}, train accuracy {correct / len(xs):.3f}", flush=True)
    model.eval()
    xa = torch.stack([load_tensor(os.path.join(out, "audit", r["path"])) for r in audit])
    with torch.no_grad():
        pred = model(xa).argmax(1)
    ya = torch.tensor([CLASSES.index(r["label"]) for r in audit])
    marked = torch.tensor([r["marked"] for r in audit]).bool()
    sq = CLASSES.index(SHORTCUT)
    stats = {
        "audit_accuracy": (pred == ya).float().mean().item(),
        # The shortcut at work: unmarked images of other classes that carry the mark are called "square".
        "marked_non_square_called_square": (pred[marked & (ya != sq)] == sq).float().mean().item(),
        "unmarked_non_square_called_square": (pred[~marked & (ya != sq)] == sq).float().mean().item(),
    }
    print(json.dumps(stats))
    export(model, "features.12", False, xa[:2].clone(),
           {"architecture": "DemoNet", "mean": MEAN, "std": STD, "resize": 72, "class_names": CLASSES},
           os.path.join(out, "model.pt"))
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump({"epochs": log, "audit": stats, "seconds": time.time() - t0}, f, indent=1)
    with open(stamp, "w") as f:
        f.write(h.hexdigest())
    print(f"demo made in {time.time() - t0:.0f} s: {out}")


if __name__ == "__main__":
    main()
