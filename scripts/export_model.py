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

Examples:
  python scripts/export_model.py --arch resnet50 --layer layer4 --out resnet50.pt
  python scripts/export_model.py --factory mypkg.models:make_net --weights net.pth \
      --layer features.28 --input-size 224 224 --class-names classes.txt --out net.pt
"""
import argparse
import importlib
import json
import sys

import torch
import torch.nn as nn

META_FILE = "saliency_audit.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        if part.isdigit() and isinstance(mod, (nn.Sequential, nn.ModuleList)):
            mod = mod[int(part)]
        elif hasattr(mod, part):
            mod = getattr(mod, part)
        else:
            names = [n for n, _ in model.named_modules() if n]
            raise SystemExit(f"error: layer path {path!r}: no submodule {part!r}; some layers: {', '.join(names[:40])}")
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


def build_model(args) -> nn.Module:
    kwargs = json.loads(args.factory_kwargs) if args.factory_kwargs else {}
    if args.arch:
        import torchvision

        if not hasattr(torchvision.models, args.arch):
            raise SystemExit(f"error: torchvision has no architecture {args.arch!r}")
        if args.num_classes is not None:
            kwargs.setdefault("num_classes", args.num_classes)
        model = getattr(torchvision.models, args.arch)(weights=None, **kwargs)
    else:
        mod_name, _, fn_name = args.factory.partition(":")
        if not fn_name:
            raise SystemExit("error: --factory takes module:function")
        sys.path.insert(0, ".")
        model = getattr(importlib.import_module(mod_name), fn_name)(**kwargs)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    return model.eval()


def export(model: nn.Module, layer_path: str, layer_input: bool, example: torch.Tensor, meta: dict, out: str,
           check: bool = True):
    for p in model.parameters():
        p.requires_grad_(False)
    layer = resolve_layer(model, layer_path)
    # Reference outputs from the eager model, captured without changing it.
    captured = []
    if layer_input:
        h = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    else:
        h = layer.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
    with torch.no_grad():
        ref_logits = model(example).clone()
    h.remove()
    ref_act = captured[0]

    wrapper = ContractWrapper(model, layer, layer_input).eval()
    traced = torch.jit.trace(wrapper, example, check_trace=False)
    wrapper.remove_hook()
    traced = traced.eval()
    if ref_act.dim() != 4:
        raise SystemExit(f"error: the layer's activation has shape {list(ref_act.shape)}; Grad-CAM needs [N, K, h, w]")
    if check:
        for call in range(2):
            x = example.clone().requires_grad_(True)
            logits, act = traced(x)
            if not (torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5) and torch.allclose(act, ref_act, rtol=1e-4, atol=1e-5)):
                raise SystemExit(f"error: the TorchScript export differs from the eager model on call {call + 1}")
            if not act.requires_grad:
                raise SystemExit("error: the exported activation is not on the autograd path")
    meta = dict(meta)
    meta.update({"layer": layer_path, "layer_input": layer_input, "channels": int(example.shape[1]),
                 "input_size": [int(example.shape[2]), int(example.shape[3])],
                 "num_classes": int(ref_logits.shape[1])})
    torch.jit.save(traced, out, _extra_files={META_FILE: json.dumps(meta)})
    return traced


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
    ap.add_argument("--input-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--resize", type=int, help="shorter-side resize the model expects before the crop")
    ap.add_argument("--mean", type=float, nargs="+", default=None)
    ap.add_argument("--std", type=float, nargs="+", default=None)
    ap.add_argument("--class-names", help="file with one class name a line, or a comma-separated list")
    ap.add_argument("--batch", type=int, default=2, help="example batch used for tracing and the check")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(args)
    mean = args.mean or (IMAGENET_MEAN if args.channels == 3 else [0.5] * args.channels)
    std = args.std or (IMAGENET_STD if args.channels == 3 else [0.5] * args.channels)
    if len(mean) != args.channels or len(std) != args.channels:
        raise SystemExit(f"error: --mean and --std need {args.channels} values")
    meta = {"architecture": args.arch or args.factory, "mean": mean, "std": std}
    if args.resize:
        meta["resize"] = args.resize
    if args.class_names:
        if "," in args.class_names or not args.class_names.endswith(".txt"):
            names = [n.strip() for n in args.class_names.split(",")]
        else:
            names = [l.strip() for l in open(args.class_names) if l.strip()]
        meta["class_names"] = names
    example = torch.randn(args.batch, args.channels, *args.input_size, generator=torch.Generator().manual_seed(0))
    export(model, args.layer, args.layer_input, example, meta, args.out)
    print(f"exported {meta['architecture']} (layer {args.layer}{' input' if args.layer_input else ''}) to {args.out}")


if __name__ == "__main__":
    main()
