"""Arguments every model-facing subcommand shares: --model, --weights, --data, --json; and how each prints its
JSON line (`print_json`)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch


def add_model_args(parser, data: bool = True) -> None:
    parser.add_argument("--model", default=None,
                        help="an embedded model (digits_resnet, digits_vit), a pytorchcv name (e.g. resnet18), "
                             "torchvision:NAME (e.g. torchvision:mobilenet_v2), timm:NAME (e.g. timm:resnet18) or "
                             "package.module:callable (your code, called with no arguments, returning an nn.Module) "
                             "(default: the embedded digits_resnet)")
    parser.add_argument("--weights", default=None, help="state-dict file to load (read with weights_only=True)")
    parser.add_argument("--pretrained", action="store_true",
                        help="load pytorchcv weights from ~/.torch/models, torchvision weights from "
                             "$TORCH_HOME/hub/checkpoints (local caches only); never downloads")
    if data:
        parser.add_argument("--data", default=None,
                            help="digits | synthetic | distilled | an ImageFolder or CIFAR-10 folder (default: "
                                 "digits for the default model, synthetic for any other); distilled: images made "
                                 "from the model's BatchNorm statistics (ZeroQ), no real data, labels the model's "
                                 "own predictions; needs trained weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


@dataclass
class ModelAndData:
    model: torch.nn.Module
    name: str
    input_shape: tuple
    data: object = None   # hawq_ray.inputs.data.DataSplits


def resolve(args, need_data: bool = True) -> ModelAndData:
    from hawq_ray.inputs import data as data_mod
    from hawq_ray.inputs import models
    name = args.model or models.DEFAULT_MODEL
    model = models.get_model(args.model, pretrained=args.pretrained, weights=args.weights)
    shape = tuple(models.input_shape(args.model if args.model else model))
    splits = None
    if need_data:
        spec = getattr(args, "data", None) or ("digits" if name in models.EMBEDDED_MODELS else "synthetic")
        splits = data_mod.load_data(spec, input_shape=shape, model=model, model_name=name, log=_stderr)
    return ModelAndData(model, name, shape, splits)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fmt_table(df, floatfmt: str = ".4g") -> str:
    if df.empty:
        return "(empty)"
    return df.to_string(index=False, float_format=lambda v: format(v, floatfmt))


def data_note(splits) -> str:
    if splits is None:
        return ""
    if getattr(splits, "distilled", False):
        from hawq_ray.inputs.data import DISTILLED_NOTE, DISTILLED_TOP1
        return f" [{DISTILLED_NOTE}; {DISTILLED_TOP1}]"
    return f" [data: {splits.name}{' (SYNTHETIC random images)' if splits.synthetic else ''}]"


def print_json(obj) -> None:
    print(json.dumps(obj, default=_jsonable))


def _jsonable(x):
    import numpy as np
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
