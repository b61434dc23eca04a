"""The IntegerProgram: the one source of truth for deployment.

A program is a straight list of integer ops over named values in NCHW layout. Every constant is an integer
numpy array; real-valued scales ride along only as metadata (to dequantize for analysis), never as inputs of
an op. Two back ends run it: `hawq_ray.program.executor` (PyTorch, integer tensors only, the reference) and
`hawq_ray.deploy` (TVM); `hawq_ray.onnx` exports it. Each op's exact semantics is stated by its entry in the op registry
(`hawq_ray.ops`, `ProgramOp.semantics`; `docs/design.md` lists them all).

Each op also records `lo`/`hi`, the integer range its output is guaranteed to lie in, so a back end may
store it narrower (uint8 for a 0..255 activation), and `scale`, its real scale (metadata).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1

@dataclass
class Op:
    op: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)   # name -> integer np.ndarray
    layer: str | None = None                     # layer-table name for conv2d/dense, node name otherwise
    scale: np.ndarray | None = None              # real scale of the output (metadata only)
    lo: int = INT32_MIN
    hi: int = INT32_MAX

    def __post_init__(self):
        # the op's name is checked where a program is run or lowered (`ops.check_ops`): the registry's ops
        # import this module, so it cannot know them
        for name, arr in self.consts.items():
            if not np.issubdtype(np.asarray(arr).dtype, np.integer):
                raise TypeError(f"{self.op} {self.output}: constant {name} must be an integer array, "
                                f"got {np.asarray(arr).dtype}")


@dataclass
class IntegerProgram:
    input_name: str
    input_shape: tuple          # (C, H, W) of one sample
    input_scale: float          # x_real ~= input_scale * q, q int8 in [-128, 127] (symmetric, 8-bit)
    ops: list[Op]
    output: str                 # INT32 logits accumulator of the last dense layer
    output_scale: np.ndarray    # per-class real scale of the output (metadata)
    bits: dict = field(default_factory=dict)   # layer -> bits

    def quantize_input(self, x):
        """Float image batch -> int8 tensor: floor(x / S + 1/2) clamped to [-128, 127] (the model's edge)."""
        import torch
        q = torch.floor(x.to(torch.float64) / self.input_scale + 0.5).clamp_(-128, 127)
        return q.to(torch.int8)

    def dequantize_output(self, q):
        import torch
        return q.to(torch.float64) * torch.as_tensor(self.output_scale, dtype=torch.float64)

    def layers(self) -> list[str]:
        return [op.layer for op in self.ops if op.op in ("conv2d", "dense")]

    def fingerprint(self) -> str:
        """SHA-256 of everything a compiled module is built from: the ops (kinds, wiring, attributes, ranges) and
        every constant's dtype, shape and bytes, the input and output. Equal fingerprints, equal integers out."""
        h = hashlib.sha256()
        head = {"input": [self.input_name, list(self.input_shape), float(self.input_scale)], "output": self.output,
                "bits": self.bits}
        h.update(json.dumps(head, sort_keys=True, default=str).encode())
        h.update(np.ascontiguousarray(np.asarray(self.output_scale, dtype=np.float64)).tobytes())
        for op in self.ops:
            h.update(json.dumps([op.op, op.inputs, op.output, op.attrs, op.layer, int(op.lo), int(op.hi),
                                 sorted(op.consts)], sort_keys=True, default=str).encode())
            for name in sorted(op.consts):
                arr = np.ascontiguousarray(np.asarray(op.consts[name]))
                h.update(f"{arr.dtype.str}{arr.shape}".encode())
                h.update(arr.tobytes())
        return h.hexdigest()

    # ---- persistence: JSON for structure, npz for constants (no pickle) ----
    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays, ops = {}, []
        for i, op in enumerate(self.ops):
            keys = {}
            for name, arr in op.consts.items():
                key = f"op{i}.{name}"
                arrays[key] = np.asarray(arr)
                keys[name] = key
            if op.scale is not None:
                arrays[f"op{i}.scale"] = np.asarray(op.scale, dtype=np.float64)
            ops.append({"op": op.op, "inputs": op.inputs, "output": op.output, "attrs": op.attrs,
                        "consts": keys, "layer": op.layer, "lo": op.lo, "hi": op.hi,
                        "scale": f"op{i}.scale" if op.scale is not None else None})
        arrays["output_scale"] = np.asarray(self.output_scale, dtype=np.float64)
        np.savez(path / "program.npz", **arrays)
        meta = {"input_name": self.input_name, "input_shape": list(self.input_shape),
                "input_scale": self.input_scale, "output": self.output, "bits": self.bits, "ops": ops}
        (path / "program.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path) -> "IntegerProgram":
        path = Path(path)
        try:
            meta = json.loads((path / "program.json").read_text())
            arrays = np.load(path / "program.npz", allow_pickle=False)
            ops = [Op(op=o["op"], inputs=o["inputs"], output=o["output"], attrs=_tuples(o["attrs"]),
                      consts={k: arrays[v] for k, v in o["consts"].items()}, layer=o["layer"],
                      scale=arrays[o["scale"]] if o["scale"] else None, lo=o["lo"], hi=o["hi"])
                   for o in meta["ops"]]
            return cls(input_name=meta["input_name"], input_shape=tuple(meta["input_shape"]),
                       input_scale=float(meta["input_scale"]), ops=ops, output=meta["output"],
                       output_scale=arrays["output_scale"], bits=meta.get("bits", {}))
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot load integer program from {path}: {e}") from None


def _tuples(attrs: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}
