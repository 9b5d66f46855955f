#!/usr/bin/env python3
"""Test cases for the attribution engine: TorchScript models (made with export_model.py), inputs,
targets, and Captum's GuidedGradCam / LayerGradCam results on the eager twin of each model.

Usage: python scripts/make_engine_cases.py OUT_DIR
Writes OUT_DIR/<case>/{model.pt, x.npy, t.npy, ref_attr.npy, ref_cam.npy} and OUT_DIR/cases.json.
"""
import copy
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_model import META_FILE, export, resolve_layer  # noqa: E402


class ToyConvNet(nn.Module):
    """Captum's BasicModel_ConvNet_One_Conv with its fixed weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU(inplace=False)
        self.fc1 = nn.Linear(8, 4)
        self.conv1.weight = nn.Parameter(torch.ones(2, 1, 3, 3))
        self.conv1.bias = nn.Parameter(torch.tensor([-50.0, -75.0]))
        self.fc1.weight = nn.Parameter(torch.cat([torch.ones(4, 5), -1 * torch.ones(4, 3)], dim=1))
        self.fc1.bias = nn.Parameter(torch.zeros(4))
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = x.view(-1, 8)
        return self.relu2(self.fc1(x))


class SmallNet(nn.Module):
    """A small CNN; `functional` uses F.relu, `inplace` uses in-place ReLUs (module and relu_)."""

    def __init__(self, channels=3, classes=7, functional=False, inplace=False):
        super().__init__()
        self.functional, self.inplace = functional, inplace
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.relu3 = nn.ReLU(inplace=inplace)
        self.relu4 = nn.ReLU(inplace=inplace)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, classes)

    def act(self, mod, x):
        if self.functional:
            return F.relu(x)
        if self.inplace:
            return x.relu_() if mod is self.relu4 else mod(x)
        return mod(x)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.relu1, self.conv1(x)), 2)
        x = F.max_pool2d(self.act(self.relu2, self.conv2(x)), 2)
        x = self.act(self.relu3, self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        x = self.act(self.relu4, self.fc1(x))
        return self.fc2(x)


class MixedRectifiers(nn.Module):
    """A small CNN with ReLU6 (a hardtanh node), leaky ReLU and ReLU modules, for the engine's
    optional guiding of ReLU6 and leaky ReLU (`guided_rectifiers`), which Captum does not do."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.LeakyReLU(0.1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.act3 = nn.ReLU()
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.act4 = nn.ReLU6()
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x):
        x = F.max_pool2d(self.act1(self.conv1(x)), 2)
        x = F.max_pool2d(self.act2(self.conv2(x)), 2)
        x = self.act3(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(self.act4(self.fc1(x)))


def guided_refs(model, layer_path, x, targets, mode, rectifiers):
    """GuidedGradCam as Captum computes it, with guided backprop's rule (the gradient a
    rectifier module passes back clamped at 0, as Captum's GuidedBackprop does for nn.ReLU)
    applied to every module of the `rectifiers` types: Captum's LayerGradCam (standard
    gradients), upsampled as Captum does, times that guided gradient."""
    from captum.attr import LayerAttribution, LayerGradCam

    layer = resolve_layer(model, layer_path)
    cam = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)
    up = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=mode)
    hooks = [m.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(min=0),))
             for m in model.modules() if isinstance(m, rectifiers)]
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    picked = out.gather(1, torch.tensor(targets).view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(picked, xg)
    for h in hooks:
        h.remove()
    return (grad * up).detach().numpy().astype(np.float32), cam.detach().numpy().astype(np.float32)


def twin(model):
    """The eager twin Captum runs on: same weights, every ReLU an out-of-place nn.ReLU module."""
    m = copy.deepcopy(model)
    if isinstance(m, SmallNet):
        m.functional, m.inplace = False, False
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return m.eval()


def narrow_vgg11(classes=10):
    import torchvision

    m = torchvision.models.vgg11(weights=None, num_classes=classes)
    # The same head layout (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear), narrowed to 128.
    m.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 128), nn.ReLU(True), nn.Dropout(),
                                 nn.Linear(128, 128), nn.ReLU(True), nn.Dropout(), nn.Linear(128, classes))
    return m.eval()


def resnet18(classes=10):
    import torchvision

    m = torchvision.models.resnet18(weights=None, num_classes=classes).eval()
    # Trained-looking batch-norm statistics, so that folding them into the convolutions (as the
    # export does) is a real change of the weights that the Captum comparison checks.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return m


def captum_refs(model, layer_path, layer_input, x, targets, mode):
    from captum.attr import GuidedGradCam, LayerGradCam

    layer = resolve_layer(model, layer_path)
    attr = GuidedGradCam(model, layer).attribute(x, target=targets, interpolate_mode=mode,
                                                 attribute_to_layer_input=layer_input)
    cam = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True,
                                               attribute_to_layer_input=layer_input)
    return attr.detach().numpy().astype(np.float32), cam.detach().numpy().astype(np.float32)


class _Bad(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = self.conv(x)
        feats = F.relu(a).mean((2, 3))
        logits = self.fc(feats)
        if self.kind == "single":
            return logits
        if self.kind == "detached":
            return logits, a.detach()
        if self.kind == "detached_logits":
            return logits.detach(), a
        if self.kind == "offpath":
            return logits, self.conv(x * 2.0)
        if self.kind == "flat":
            return logits, feats
        return logits, a, feats


def bad_models(d):
    """TorchScript files that break the model contract, one way each."""
    os.makedirs(d, exist_ok=True)
    x = torch.randn(2, 3, 8, 8)
    for kind in ["single", "detached", "detached_logits", "offpath", "flat", "triple"]:
        m = _Bad(kind).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        torch.jit.trace(m, x, check_trace=False).save(os.path.join(d, kind + ".pt"))
    np.save(os.path.join(d, "x.npy"), x.numpy())


class _Greedy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] > 2:
            x = x + torch.zeros([1 << 56], device=x.device)[:1].sum()
        return self.inner(x)


def pipeline_model(d):
    """A 3-class model with metadata (input 32x32, resize 36, class names) for pipeline tests."""
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(3)
    m = SmallNet(channels=3, classes=3).eval()
    meta = {"architecture": "SmallNet", "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "resize": 36,
            "class_names": ["circle", "square", "triangle"]}
    export(m, "conv3", False, torch.randn(2, 3, 32, 32), meta, os.path.join(d, "model.pt"))
    # Its eager weights, for the end-to-end reference (scripts/captum_reference.py).
    torch.save(m.state_dict(), os.path.join(d, "model_eager.pth"))
    # The same model, scripted around a forward that runs out of memory for batches over 2 (an
    # allocation of 256 PiB, beyond any address space, so refused at once even where memory is
    # overcommitted, inside the TorchScript interpreter).
    extra = {META_FILE: ""}
    inner = torch.jit.load(os.path.join(d, "model.pt"), _extra_files=extra)
    greedy = torch.jit.script(_Greedy(inner))
    torch.jit.save(greedy, os.path.join(d, "model_oom_over_2.pt"), _extra_files=extra)
    m1 = SmallNet(channels=1, classes=3).eval()
    meta1 = dict(meta, mean=[0.5], std=[0.25])
    export(m1, "conv3", False, torch.randn(2, 1, 32, 32), meta1, os.path.join(d, "model_gray.pt"))
    torch.save(m1.state_dict(), os.path.join(d, "model_gray_eager.pth"))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cases = []

    def add(name, model, layer, x, targets, batch, mode="nearest", layer_input=False, predicted=False,
            rectifiers=None):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        for p in model.parameters():
            p.requires_grad_(False)
        # The TorchScript export keeps the model as it is (in-place or functional ReLUs included);
        # Captum runs on the out-of-place nn.ReLU twin.
        export(model, layer, layer_input, x[:2].clone(), {"architecture": name}, os.path.join(d, "model.pt"))
        ref_model = twin(model)
        if predicted:
            with torch.no_grad():
                targets = ref_model(x).argmax(1).tolist()
        def refs(x, targets):
            if rectifiers:
                return guided_refs(ref_model, layer, x, targets, mode, rectifiers[1])
            return captum_refs(ref_model, layer, layer_input, x, targets, mode)

        attr, cam = refs(x.clone(), targets)
        if not predicted:
            # A sample whose Grad-CAM is negative everywhere attributes nothing (ReLU(CAM) = 0),
            # so it would check only "CAM = 0", not the guided gradient; one whose CAM nearly
            # cancels (an attribution under 1e-3 of the case's largest) is ill-conditioned, its
            # relative error dominated by rounding. Give such a sample the class with the
            # largest attribution.
            with torch.no_grad():
                classes = ref_model(x[:1]).shape[1]
            changed = False
            norms = [np.linalg.norm(attr[i]) for i in range(x.shape[0])]
            for i in range(x.shape[0]):
                if norms[i] > 0 and norms[i] >= 1e-3 * max(norms):
                    continue
                by_class = [np.linalg.norm(refs(x[i:i + 1].clone(), [c])[0]) for c in range(classes)]
                targets[i], changed = int(np.argmax(by_class)), True
            if changed:
                attr, cam = refs(x.clone(), targets)
        zero = [i for i in range(x.shape[0]) if not np.any(attr[i])]
        np.save(os.path.join(d, "x.npy"), x.numpy().astype(np.float32))
        np.save(os.path.join(d, "t.npy"), np.asarray(targets, dtype=np.int64))
        np.save(os.path.join(d, "ref_attr.npy"), attr)
        np.save(os.path.join(d, "ref_cam.npy"), cam)
        cases.append({"name": name, "batch": batch, "interpolate_mode": mode, "predicted": predicted,
                      "n": int(x.shape[0]), "zero_samples": zero,
                      "rectifiers": rectifiers[0] if rectifiers else ["relu"]})
        print(f"case {name}: x {list(x.shape)}, |ref| {np.linalg.norm(attr):.4g}, all-zero samples {zero}",
              flush=True)

    def rand(n, c, h, w):
        return torch.randn(n, c, h, w, generator=g)

    def targets(n, k):
        return torch.randint(0, k, (n,), generator=g).tolist()

    r18 = resnet18()  # torchvision's default: in-place ReLU modules, each used twice per block
    add("resnet18_layer4", r18, "layer4", rand(6, 3, 64, 64), targets(6, 10), batch=4)
    add("resnet18_layer3_bilinear", r18, "layer3", rand(5, 3, 64, 64), targets(5, 10), batch=2, mode="bilinear")
    add("resnet18_layer4_input", r18, "layer4", rand(5, 3, 64, 64), targets(5, 10), batch=3, layer_input=True)
    add("resnet18_predicted_area", r18, "layer4", rand(4, 3, 64, 64), None, batch=3, mode="area", predicted=True)
    add("vgg11_conv", narrow_vgg11(), "features.18", rand(5, 3, 64, 64), targets(5, 10), batch=2)
    add("functional_relu", SmallNet(functional=True), "conv3", rand(6, 3, 32, 32), targets(6, 7), batch=4)
    add("inplace_relu", SmallNet(inplace=True), "conv2", rand(6, 3, 32, 32), targets(6, 7), batch=5, mode="bicubic")
    add("one_channel", SmallNet(channels=1), "conv3", rand(5, 1, 32, 32), targets(5, 7), batch=2)
    add("relu6_leaky_guided", MixedRectifiers(), "conv3", rand(5, 3, 32, 32), targets(5, 5), batch=3,
        rectifiers=(["relu", "relu6", "leaky_relu"], (nn.ReLU, nn.ReLU6, nn.LeakyReLU)))
    a = torch.arange(16.0).view(1, 1, 4, 4)
    add("toy_relu1", ToyConvNet(), "relu1", a, [0], batch=1)
    add("toy_conv1", ToyConvNet(), "conv1", a, [0], batch=1)
    a_neg = a.clone()
    a_neg[0, 0, 1, 1] = -4
    add("toy_conv1_input", ToyConvNet(), "conv1", a_neg, [0], batch=1, layer_input=True)
    bad_models(os.path.join(out, "bad"))
    pipeline_model(os.path.join(out, "pipeline"))
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main()
