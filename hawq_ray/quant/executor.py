"""The PyTorch integer executor: runs an IntegerProgram with integer tensors only (the reference).

Convolutions are im2col + exact integer matrix products (`int_matmul`: a float GEMM only where a bound
proves it exact, else int64); pooling, requantization (dyadic.requantize), add and concat are integer ops.
Every op checks that its inputs and output are integer tensors: a float tensor anywhere is an error.
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


FLOAT32_EXACT = 1 << 24   # every integer of magnitude up to 2^24 is a float32
FLOAT64_EXACT = 1 << 53


def exact_dtype(x_absmax: int, w: torch.Tensor) -> torch.dtype:
    """The cheapest dtype in which x @ w.T (w: (O, K) integers, |x| <= x_absmax) is computed exactly.

    With B = x_absmax * max_o sum_k |w[o, k]|, every product and every partial sum, in any order, is an
    integer of magnitude at most B; float32 holds all integers up to 2^24 and float64 up to 2^53 exactly, so
    a float GEMM below those bounds is exact; int64 otherwise. (An int8 x int8 -> int32 GEMM is exact too,
    but on a CPU without VNNI an order of magnitude slower than float32.)"""
    bound = x_absmax * (int(w.to(torch.int64).abs().sum(1).max()) if w.numel() else 0)
    return torch.float32 if bound < FLOAT32_EXACT else torch.float64 if bound < FLOAT64_EXACT else torch.int64


def int_matmul(cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """cols (M, K) @ w (O, K).T exactly, as int64 (in the dtype `exact_dtype` picks)."""
    dtype = exact_dtype(int(cols.abs().max()) if cols.numel() else 0, w)
    return (cols.to(dtype) @ w.to(dtype).T).to(torch.int64)


def conv2d(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    o, ipg, kh, kw = weight.shape
    dtype = exact_dtype(int(x.abs().max()) if x.numel() else 0, weight.reshape(o, -1))
    x = F.pad(x.to(dtype), (padding[1], padding[1], padding[0], padding[0]))   # zero point 0: pad with 0
    w = weight.to(dtype)
    win = _windows(x, (kh, kw), stride, dilation)                     # N, C, Ho, Wo, kh, kw
    n, _, ho, wo = win.shape[:4]
    # one matrix product per group, batched: (G, N*Ho*Wo, ipg*kh*kw) @ (G, ipg*kh*kw, O/G)
    cols = win.reshape(n, groups, ipg, ho, wo, kh, kw).permute(1, 0, 3, 4, 2, 5, 6).reshape(
        groups, n * ho * wo, ipg * kh * kw)
    out = torch.bmm(cols, w.reshape(groups, o // groups, -1).transpose(1, 2)).to(torch.int64)
    out = out.permute(1, 0, 2).reshape(n, ho, wo, o).permute(0, 3, 1, 2)
    return out + bias.reshape(1, -1, 1, 1)


def _pool_pad(x, kernel, stride, padding, ceil_mode, fill, dilation=(1, 1)):
    """Pad for pooling; ceil_mode adds the extra right/bottom padding torch would use (for the window's
    dilated extent)."""
    h, w = x.shape[2:]
    extra = []
    for size, k, s, p in ((h, (kernel[0] - 1) * dilation[0] + 1, stride[0], padding[0]),
                          (w, (kernel[1] - 1) * dilation[1] + 1, stride[1], padding[1])):
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
        x = _pool_pad(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], torch.iinfo(torch.int64).min,
                      a["dilation"])
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
