"""The PyTorch integer executor: runs an IntegerProgram with integer tensors only (the reference).

Convolutions are im2col + integer matrix products (int8 x int8 -> int32 where the operands fit, int64
otherwise); pooling, requantization (dyadic.requantize), add and
concat are integer ops. Every op checks that its inputs and output are integer tensors: a float tensor
anywhere is an error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hawq_ray.quant.dyadic import requantize
from hawq_ray.quant.program import IntegerProgram, Op


class FloatTensorError(TypeError):
    pass


def _int(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise FloatTensorError(f"integer executor: {where} is a {t.dtype} tensor")
    return t


def _windows(x: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, Ho, Wo, kh, kw) views of the (already padded) input."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    win = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
    return win[..., ::dh, ::dw]


def _int8_operand(x: torch.Tensor):
    """Express integer activations as int8 for an int8 x int8 -> int32 product.

    Returns (x8, offset) with x = x8 + offset: offset 0 when x already fits int8, 128 for unsigned
    8-bit activations (the product then gains offset * sum(W), added back exactly in INT32).
    """
    lo, hi = int(x.min()), int(x.max())
    if -128 <= lo and hi <= 127:
        return x.to(torch.int8), 0
    if 0 <= lo and hi <= 255:
        return (x - 128).to(torch.int8), 128
    return None, 0


def int_matmul(cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """cols (M, K) @ w (O, K).T exactly: int8 x int8 -> int32 when both fit, else int64."""
    c8, offset = _int8_operand(cols)
    if c8 is not None and w.numel() and int(w.abs().max()) <= 127:
        out = torch._int_mm(c8, w.to(torch.int8).T.contiguous()).to(torch.int64)
        if offset:
            out += offset * w.to(torch.int64).sum(1)
        return out
    return cols.to(torch.int64) @ w.to(torch.int64).T


def conv2d(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))   # zero point 0: pad with 0
    if int(x.min()) >= -128 and int(x.max()) <= 255:
        x = x.to(torch.int16)                                         # narrower im2col copies
    o, ipg, kh, kw = weight.shape
    win = _windows(x, (kh, kw), stride, dilation)                     # N, C, Ho, Wo, kh, kw
    n, _, ho, wo = win.shape[:4]
    outs = []
    for g in range(groups):
        cols = win[:, g * ipg:(g + 1) * ipg].permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, ipg * kh * kw)
        wg = weight[g * (o // groups):(g + 1) * (o // groups)].reshape(o // groups, -1)
        outs.append(int_matmul(cols, wg))
    out = torch.cat(outs, 1).reshape(n, ho, wo, o).permute(0, 3, 1, 2)
    return out + bias.reshape(1, -1, 1, 1)


def _pool_pad(x, kernel, stride, padding, ceil_mode, fill):
    """Pad for pooling; ceil_mode adds the extra right/bottom padding torch would use."""
    h, w = x.shape[2:]
    extra = []
    for size, k, s, p in ((h, kernel[0], stride[0], padding[0]), (w, kernel[1], stride[1], padding[1])):
        out = (size + 2 * p - k + ((s - 1) if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        extra.append(max(0, (out - 1) * s + k - size - 2 * p))
    return F.pad(x, (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]), value=fill)


def run_op(op: Op, ins: list[torch.Tensor]) -> torch.Tensor:
    a = op.attrs
    c = {k: torch.as_tensor(v, dtype=torch.int64) for k, v in op.consts.items()}
    if op.op == "conv2d":
        return conv2d(ins[0].to(torch.int64), c["weight"], c["bias"], a["stride"], a["padding"],
                      a["dilation"], a["groups"])
    if op.op == "dense":
        return int_matmul(ins[0], c["weight"]) + c["bias"]
    if op.op == "requantize":
        return requantize(ins[0], c["multiplier"], c["shift"], op.lo, op.hi)
    if op.op == "relu":
        return ins[0].clamp_min(0)
    if op.op == "add":
        return ins[0].to(torch.int64) + ins[1].to(torch.int64)
    if op.op == "concat":
        return torch.cat([t.to(torch.int64) for t in ins], a.get("axis", 1))
    if op.op == "sum_pool2d":
        x = _pool_pad(ins[0].to(torch.int64), a["kernel"], a["stride"], a["padding"], a["ceil_mode"], 0)
        return _windows(x, a["kernel"], a["stride"], (1, 1)).sum(dim=(-1, -2))
    if op.op == "max_pool2d":
        x = ins[0].to(torch.int64)
        x = _pool_pad(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], torch.iinfo(torch.int64).min)
        return _windows(x, a["kernel"], a["stride"], a["dilation"]).amax(dim=(-1, -2))
    if op.op == "flatten":
        return ins[0].reshape(ins[0].shape[0], -1)
    raise ValueError(f"integer executor: unknown op {op.op!r}")


def run_program(program: IntegerProgram, q_input: torch.Tensor, record: bool = False):
    """Run `program` on an int8 input batch; returns the INT32 output (and every value if `record`)."""
    values = {program.input_name: _int(q_input, "the program input")}
    with torch.no_grad():
        for op in program.ops:
            ins = [_int(values[i], f"input {i!r} of {op.op} {op.output!r}") for i in op.inputs]
            values[op.output] = _int(run_op(op, ins), f"output of {op.op} {op.output!r}")
    out = values[program.output]
    return (out, values) if record else out
