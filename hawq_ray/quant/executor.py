"""The PyTorch integer executor: runs an IntegerProgram with integer tensors only (the reference).

Convolutions are im2col + int64 matrix products; pooling, requantization (dyadic.requantize), add and
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


def conv2d(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))   # zero point 0: pad with 0
    o, ipg, kh, kw = weight.shape
    win = _windows(x, (kh, kw), stride, dilation)                     # N, C, Ho, Wo, kh, kw
    n, _, ho, wo = win.shape[:4]
    outs = []
    for g in range(groups):
        cols = win[:, g * ipg:(g + 1) * ipg].permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, ipg * kh * kw)
        wg = weight[g * (o // groups):(g + 1) * (o // groups)].reshape(o // groups, -1)
        outs.append(cols @ wg.T)
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
        return ins[0].to(torch.int64) @ c["weight"].T + c["bias"]
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
