#!/usr/bin/env python3
"""Export a PyTorch classifier to saliency-audit's TorchScript model contract.

The exported file's forward(x) returns (logits [N, classes], activation [N, K, h, w]), where
activation is the output (or, with --layer-input, the input) of the Grad-CAM layer. The layer's
output is captured by a forward hook that hands a clone to the rest of the network, so an
in-place op right after the layer (ReLU(inplace=True)) changes the clone, not the captured
activation, which stays on the autograd path to the logits. Metadata (input size, mean/std, class
names, layer path) is embedded as the extra file `saliency_audit.json`. The export is checked
against the eager model (two calls, the second through TorchScript's optimised path) before it
is saved.

Batch normalisation that directly follows a convolution is folded into the convolution's weights
and bias first (eval mode: BN is a fixed per-channel affine map, so the model computes the same
function, up to float rounding, and the export check above still holds): one memory-bound
pass fewer per BN in the forward and in both backward passes. Pairs that straddle the Grad-CAM
layer's boundary are left as they are, so the activation does not change. Guided backprop
amplifies the changed rounding a little (ResNet-18 at 224x224 on the CPU: 2.8e-4 relative L2
from Captum on the eager model, against 0 unfolded); --no-fold-batchnorm turns folding off for
bit-for-bit agreement.

Examples:
  python scripts/export_model.py --arch resnet50 --layer layer4 --out resnet50.pt
  python scripts/export_model.py --factory mypkg.models:make_net --weights net.pth \
      --layer features.28 --input-size 224 224 --class-names classes.txt --out net.pt
"""
import argparse
import copy
import importlib
import json
import os
import sys

import torch
import torch.nn as nn

META_FILE = "saliency_audit.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for i, part in enumerate(path.split(".")):
        if part.isdigit() and isinstance(mod, (nn.Sequential, nn.ModuleList)):
            if int(part) >= len(mod):
                raise SystemExit(f"error: layer path {path!r}: {part} is past the end of a sequence of {len(mod)}")
            mod = mod[int(part)]
        elif hasattr(mod, part):
            mod = getattr(mod, part)
        else:
            # What is there at this level (the top-level children for a first part: layer4,
            # avgpool, fc rather than the first forty paths of the tree).
            done = path.split(".")[:i]
            where = f"under {'.'.join(done)!r}" if done else "at the top level"
            names = [n for n, _ in mod.named_children()]
            raise SystemExit(f"error: layer path {path!r}: no submodule {part!r}; the modules {where}: "
                             f"{', '.join(names) or '(none)'}")
    if not isinstance(mod, nn.Module):
        raise SystemExit(f"error: layer path {path!r} is not a module")
    return mod


class ContractWrapper(nn.Module):
    """forward(x) -> (logits, activation of `layer`)."""

    def __init__(self, model: nn.Module, layer: nn.Module, layer_input: bool):
        super().__init__()
        self.model = model
        self._captured = []
        if layer_input:
            self._handle = layer.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = layer.register_forward_hook(self._post_hook)

    def remove_hook(self):
        """Leaves the eager model as it was (the export has recorded the hook's effect)."""
        self._handle.remove()

    def _pre_hook(self, module, args):
        self._captured.append(args[0])
        return (args[0].clone(),) + tuple(args[1:])

    def _post_hook(self, module, args, output):
        if not torch.is_tensor(output):
            raise SystemExit("error: the layer's output is not a single tensor")
        self._captured.append(output)
        return output.clone()

    def forward(self, x):
        self._captured.clear()
        logits = self.model(x)
        if len(self._captured) != 1:
            raise SystemExit(f"error: the layer ran {len(self._captured)} times in one forward; choose a layer that runs once")
        act = self._captured[0]
        self._captured.clear()
        return logits, act


def fold_batchnorm(model: nn.Module, layer_path: str):
    """A copy of `model` with every BatchNorm2d that is the only user of a Conv2d's output folded
    into that convolution (and replaced by Identity). Returns (model, number folded); the model
    itself when torch.fx cannot trace it or nothing folds."""
    if model.training:
        return model, 0
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 -- any tracing failure only means no folding
        print(f"note: batch norm not folded ({type(e).__name__}: torch.fx cannot trace the model)", file=sys.stderr)
        return model, 0
    modules = dict(model.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def inside(name):
        return name == layer_path or name.startswith(layer_path + ".")

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d)):
            continue
        conv, bn = modules[src.target], modules[node.target]
        if (len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1 or len(node.args) != 1
                or node.kwargs or bn.running_mean is None or conv.padding_mode != "zeros"
                or inside(src.target) != inside(node.target)):
            continue
        pairs.append((src.target, node.target))
    if not pairs:
        return model, 0
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model)

    def put(path, module):
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, module)

    for conv_path, bn_path in pairs:
        fused = fuse_conv_bn_eval(model.get_submodule(conv_path), model.get_submodule(bn_path))
        for p in fused.parameters():
            p.requires_grad_(False)
        put(conv_path, fused)
        put(bn_path, nn.Identity())
    return model, len(pairs)


def build_model(args) -> nn.Module:
    kwargs = json.loads(args.factory_kwargs) if args.factory_kwargs else {}
    if args.arch:
        import torchvision

        builder = getattr(torchvision.models, args.arch, None)
        if builder is None or not callable(builder) or isinstance(builder, type(torchvision)):
            raise SystemExit(f"error: torchvision has no architecture {args.arch!r} (a model builder such as resnet50)")
        if args.num_classes is not None:
            kwargs.setdefault("num_classes", args.num_classes)
        model = getattr(torchvision.models, args.arch)(weights=None, **kwargs)
    else:
        mod_name, _, fn_name = args.factory.partition(":")
        if not fn_name:
            raise SystemExit("error: --factory takes module:function")
        if args.num_classes is not None:
            raise SystemExit("error: --num-classes applies to --arch; give a factory its own arguments with "
                             "--factory-kwargs '{\"num_classes\": N}' (if it takes one)")
        sys.path.insert(0, ".")
        model = getattr(importlib.import_module(mod_name), fn_name)(**kwargs)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    return model.eval()


def close(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to float rounding, relative to the tensor's scale (folding batch norm changes the
    rounding of every value by about 1e-7 of the largest)."""
    return a.shape == ref.shape and float((a.detach() - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6


def export(model: nn.Module, layer_path: str, layer_input: bool, example: torch.Tensor, meta: dict, out: str,
           check: bool = True, fold_bn: bool = True):
    for p in model.parameters():
        p.requires_grad_(False)
    layer = resolve_layer(model, layer_path)
    # Reference outputs from the eager model (the given one, not the folded copy), captured
    # without changing it.
    captured = []
    if layer_input:
        h = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    else:
        h = layer.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
    with torch.no_grad():
        ref_logits = model(example)
    h.remove()
    if not torch.is_tensor(ref_logits) or ref_logits.dim() != 2:
        what = f"shape {list(ref_logits.shape)}" if torch.is_tensor(ref_logits) else type(ref_logits).__name__
        raise SystemExit(f"error: the model's forward returns {what}; the export needs logits [N, classes]")
    ref_logits = ref_logits.clone()
    if not captured:
        raise SystemExit(f"error: layer {layer_path!r} did not run in the model's forward; choose a layer on the "
                         "path to the logits")
    ref_act = captured[0]

    folded = 0
    if fold_bn:
        model, folded = fold_batchnorm(model, layer_path)
        layer = resolve_layer(model, layer_path)
    wrapper = ContractWrapper(model, layer, layer_input).eval()
    traced = torch.jit.trace(wrapper, example, check_trace=False)
    wrapper.remove_hook()
    traced = traced.eval()
    if ref_act.dim() != 4:
        raise SystemExit(f"error: the layer's activation has shape {list(ref_act.shape)}; Grad-CAM needs [N, K, h, w]")
    if ref_act.shape[2] * ref_act.shape[3] == 1:
        print(f"warning: layer {layer_path!r} gives a 1x1 activation: its Grad-CAM is one value per image, so every "
              "map is the guided gradient scaled (or all zero); choose the last layer before the pooling",
              file=sys.stderr)
    names = meta.get("class_names")
    if names is not None and len(names) != ref_logits.shape[1]:
        raise SystemExit(f"error: {len(names)} class names for a model of {ref_logits.shape[1]} classes")
    if check:
        for call in range(2):
            x = example.clone().requires_grad_(True)
            logits, act = traced(x)
            if not (close(logits, ref_logits) and close(act, ref_act)):
                raise SystemExit(f"error: the TorchScript export differs from the eager model on call {call + 1}")
            if not act.requires_grad:
                raise SystemExit(f"error: the activation of layer {layer_path!r} is not on the autograd path to the "
                                 "logits (its output does not feed them, or is detached): Grad-CAM needs a layer "
                                 "the logits are computed from, usually the last convolutional block")
    meta = dict(meta)
    meta.update({"layer": layer_path, "layer_input": layer_input, "channels": int(example.shape[1]),
                 "input_size": [int(example.shape[2]), int(example.shape[3])],
                 "num_classes": int(ref_logits.shape[1]), "folded_batchnorm": folded})
    torch.jit.save(traced, out, _extra_files={META_FILE: json.dumps(meta)})
    return traced, folded


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="torchvision architecture name, e.g. resnet50")
    src.add_argument("--factory", help="module:function returning an nn.Module")
    ap.add_argument("--factory-kwargs", help="JSON object of keyword arguments for the architecture or factory")
    ap.add_argument("--weights", help="state_dict file (torch.save) to load")
    ap.add_argument("--num-classes", type=int)
    ap.add_argument("--layer", required=True, help="path of the Grad-CAM layer, e.g. layer4 or features.28")
    ap.add_argument("--layer-input", action="store_true", help="attribute to the layer's input instead of its output")
    ap.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default 224 224")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--resize", type=int, help="shorter-side resize the model expects before the crop")
    ap.add_argument("--mean", type=float, nargs="+", default=None)
    ap.add_argument("--std", type=float, nargs="+", default=None)
    ap.add_argument("--class-names", help="file with one class name a line, or a comma-separated list")
    ap.add_argument("--batch", type=int, default=2, help="example batch used for tracing and the check")
    ap.add_argument("--no-fold-batchnorm", dest="fold_bn", action="store_false",
                    help="keep BatchNorm layers as they are (by default each one right after a convolution is folded into it)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(args)
    mean = args.mean or (IMAGENET_MEAN if args.channels == 3 else [0.5] * args.channels)
    std = args.std or (IMAGENET_STD if args.channels == 3 else [0.5] * args.channels)
    if len(mean) != args.channels or len(std) != args.channels:
        raise SystemExit(f"error: --mean and --std need {args.channels} values")
    # torchvision's Normalize after ToTensor: values on the 0..1 scale.
    if any(not 0 <= m <= 1 for m in mean) or any(not 0 < v <= 1 for v in std):
        raise SystemExit(f"error: --mean {mean} and --std {std} must be on the 0..1 scale (as after ToTensor): "
                         "divide values given for 0..255 pixels by 255")
    input_size = args.input_size or [224, 224]
    defaults = [f"--{k} {' '.join(map(str, v))}" for k, v, given in
                [("mean", mean, args.mean), ("std", std, args.std), ("input-size", input_size, args.input_size)]
                if not given]
    if args.factory and defaults:
        print(f"note: defaults embedded, not given: {', '.join(defaults)} (a job uses them unless it sets its own)",
              file=sys.stderr)
    meta = {"architecture": args.arch or args.factory, "mean": mean, "std": std}
    if args.resize:
        meta["resize"] = args.resize
    if args.class_names:
        # A file (any name) of one class name a line, else a comma-separated list.
        if os.path.isfile(args.class_names):
            with open(args.class_names, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        else:
            names = [n.strip() for n in args.class_names.split(",")]
        meta["class_names"] = names
    example = torch.randn(args.batch, args.channels, *input_size, generator=torch.Generator().manual_seed(0))
    _, folded = export(model, args.layer, args.layer_input, example, meta, args.out, fold_bn=args.fold_bn)
    print(f"exported {meta['architecture']} (layer {args.layer}{' input' if args.layer_input else ''}) to {args.out}: "
          f"logits and activation checked against the eager model; {folded} batch norm(s) folded into convolutions")
    embedded = {"input_size": input_size, **{k: meta[k] for k in ("resize", "mean", "std") if k in meta}}
    names = meta.get("class_names")
    embedded["class_names"] = f"{len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names \
        else "none (labels must be class ids)"
    print("metadata: " + "; ".join(f"{k} {v}" for k, v in embedded.items()))


if __name__ == "__main__":
    main()
