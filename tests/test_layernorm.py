"""The integer LayerNorm program op (`hawq_ray.ops.layernorm`): the executor against the independent Python-integer
reference (`numpy_reference.ref_layer_norm`, math.isqrt and //), edge cases at the bounds, the dequantized output
against torch's float layer_norm within the bound the module derives, and the TVM kernel and the ONNX converter
equal to the executor."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hawq_ray.contract import HawqError
from hawq_ray.ops.layernorm import isqrt, layer_norm_constants
from hawq_ray.program.executor import run_op
from hawq_ray.program.program import IntegerProgram, Op
from numpy_reference import ref_layer_norm

I16 = (-(1 << 15), (1 << 15) - 1)


def ln_op(c, gamma, beta, eps=0.0, s_in=1.0, s_out=None, clamp=I16, per_tensor=False, name="ln", src="x",
          center=True):
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    if s_out is None:
        s_out = (math.sqrt(max(c - 1, 1)) * np.abs(gamma).max() + np.abs(beta).max()) / max(-clamp[0], clamp[1])
    consts, attrs = layer_norm_constants(gamma, beta, eps, s_in, s_out, c)
    if per_tensor:
        consts = {k: v[:1].reshape(()) for k, v in consts.items()}
    return Op("layer_norm", [src], name, attrs={**attrs, "lo": clamp[0], "hi": clamp[1], "center": center}, consts=consts,
              scale=np.asarray(s_out), lo=clamp[0], hi=clamp[1])


def run(op, x):
    return run_op(op, [torch.as_tensor(np.asarray(x), dtype=torch.int64)]).numpy()


def ref(op, x):
    c = op.consts
    return ref_layer_norm(x, c["multiplier"], c["shift"], c["bias"], op.attrs["eps"], op.attrs["lo"], op.attrs["hi"],
                          center=op.attrs["center"])


def test_isqrt_is_floor_sqrt():
    vals = [0, 1, 2, 3, 4, 15, 16, 17, (1 << 31) - 1, (1 << 62) - 1, (1 << 61) + 12345]
    rng = np.random.default_rng(0)
    vals += [int(v) for v in rng.integers(0, 1 << 62, 200)] + [k * k - 1 for k in range(1, 50)] + \
        [((1 << 31) - 1) ** 2, ((1 << 31) - 1) ** 2 - 1]
    got = isqrt(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [math.isqrt(v) for v in vals]


@pytest.mark.parametrize("shape,bits,per_tensor", [((2, 12, 3, 5), 16, False), ((3, 40), 16, True),
                                                   ((2, 1, 2, 2), 8, False), ((4, 768), 8, False)])
def test_executor_equals_the_python_integer_reference(shape, bits, per_tensor):
    rng = np.random.default_rng(len(shape) * 100 + shape[1])
    c = shape[1]
    lim = 1 << (bits - 1)
    x = rng.integers(-lim, lim, shape)
    for eps in (0.0, 1e-5, 3.0):
        op = ln_op(c, rng.uniform(-2, 2, c), rng.uniform(-1, 1, c), eps=eps, per_tensor=per_tensor)
        assert np.array_equal(run(op, x), ref(op, x))


def test_edges_constant_channels_extremes_and_one_channel():
    c = 64
    op = ln_op(c, np.linspace(-2, 2, c), np.linspace(-1, 1, c))
    beta_codes = ref(op, np.zeros((1, c)))
    const = np.full((3, c, 2, 2), 0)
    const[1], const[2] = I16[0], I16[1]
    out = run(op, const)                          # variance 0 (eps 0): r = 1, every d = 0 -> out = beta's codes
    assert np.array_equal(out, ref(op, const))
    assert np.array_equal(out[:, :, 0, 0], np.repeat(beta_codes, 3, 0))
    one_hot = np.full((2, c), -(1 << 15) + 1)   # the extremes: one channel at each end (the largest |d| / std)
    one_hot[0, 5], one_hot[1] = (1 << 15) - 1, (1 << 15) - 1
    one_hot[1, 7] = -(1 << 15)
    edge = ln_op(c, np.ones(c), np.zeros(c), s_out=math.sqrt(c - 1) / 32767)
    got = run(edge, one_hot)
    assert np.array_equal(got, ref(edge, one_hot))
    assert abs(int(got[0, 5]) - 32767) <= 2 and abs(int(got[1, 7]) + 32767) <= 2    # x_hat = +-sqrt(C - 1)
    one = ln_op(1, [1.5], [0.25], s_out=0.01)     # C = 1: defined, d = 0, out = beta
    assert run(one, np.array([[[[7]]], [[[-9]]]])).ravel().tolist() == [25, 25]
    with pytest.raises(HawqError, match="int16"):
        run(op, np.full((1, c), 1 << 15))
    with pytest.raises(HawqError, match="spread"):
        big = ln_op(8192, np.ones(8192), np.zeros(8192))
        x = np.zeros((1, 8192), np.int64)
        x[0, 0] = 1 << 15
        run(big, x)
    with pytest.raises(HawqError, match="axis 1 of a rank-1 value"):
        run(op, np.zeros((c,)))


def test_dequantized_output_is_within_the_derived_bound_of_torch_layer_norm():
    rng = np.random.default_rng(7)
    for shape, s_in in (((4, 96, 3, 3), 0.013), ((8, 384), 0.002), ((2, 24, 5, 5), 0.5)):
        c = shape[1]
        x = rng.integers(-30000, 30000, shape) // rng.integers(1, 300, (shape[0], 1) + (1,) * (len(shape) - 2))
        gamma, beta = rng.uniform(-2, 2, c), rng.uniform(-1, 1, c)
        eps_int = 1 + c * c                      # an eps whose integer is exact: eps = eps_int s_in^2 / C^2
        eps = eps_int * s_in ** 2 / c ** 2
        op = ln_op(c, gamma, beta, eps=eps, s_in=s_in)
        assert op.attrs["eps"] == eps_int
        s_out = float(op.scale)
        got = torch.from_numpy(run(op, x)).double() * s_out
        xr = torch.from_numpy(x).double() * s_in
        g, b = torch.from_numpy(gamma), torch.from_numpy(beta)
        if len(shape) == 4:
            want = F.layer_norm(xr.permute(0, 2, 3, 1), (c,), g, b, eps).permute(0, 3, 1, 2)
            view = (1, c, 1, 1)
        else:
            want, view = F.layer_norm(xr, (c,), g, b, eps), (1, c)
        var = xr.var(1, unbiased=False, keepdim=True)
        xhat = (xr - xr.mean(1, keepdim=True)) / torch.sqrt(var + eps)
        v = var / s_in ** 2 * c * c + eps_int                          # V in integers
        shift = torch.from_numpy(op.consts["shift"].astype(np.float64)).reshape(view)
        bound = g.abs().reshape(view) * (xhat.abs() * (1 / (8 * v.sqrt() - 1) + 2 ** -22 + 2 ** -29) + 2 ** -17) \
            + s_out * (0.5 + 2.0 ** -(shift + 1)) + 1e-12
        err = (got - want).abs()
        assert bool((err <= bound).all()), float((err - bound).max())
        assert float(err.max()) < 0.01 * float(want.abs().max())


@pytest.mark.parametrize("shape", [(2, 12, 3, 5), (3, 40), (4, 4096)])
def test_uncentered_executor_equals_the_python_integer_reference_up_to_its_bound(shape):
    rng = np.random.default_rng(shape[1])
    c = shape[1]
    x = rng.integers(-(1 << 15), 1 << 15, shape)
    x[0, :] = -(1 << 15)                          # C * 2 max|x| = 2^28 at C = 4096: the bound's edge
    for eps in (0.0, 1e-5):
        op = ln_op(c, rng.uniform(-2, 2, c), rng.uniform(-1, 1, c), eps=eps, center=False)
        assert np.array_equal(run(op, x), ref(op, x))
    if c == 4096:
        with pytest.raises(HawqError, match="spread"):
            run(ln_op(8192, np.ones(8192), np.zeros(8192), center=False), np.full((1, 8192), -(1 << 15)))


@pytest.mark.parametrize("kind", ["rms_norm", "normalize"])
def test_uncentered_output_is_within_the_derived_bound_of_torch(kind):
    """RMSNorm (gamma, eps) and F.normalize (gamma C^-1/2, eps 0) against torch in float64: the bound of the
    centered test with x_hat = x / rms(x) and sqrt(C) in place of sqrt(C - 1)."""
    rng = np.random.default_rng(3)
    for shape, s_in in (((4, 96, 3, 3), 0.013), ((8, 32), 0.002)):
        c = shape[1]
        x = rng.integers(-30000, 30000, shape) // rng.integers(1, 300, (shape[0], 1) + (1,) * (len(shape) - 2))
        if kind == "rms_norm":
            gamma, beta, eps_int = rng.uniform(-2, 2, c), np.zeros(c), 1 + c * c
        else:
            gamma, beta, eps_int = np.full(c, c ** -0.5), np.zeros(c), 0
        eps = eps_int * s_in ** 2 / c ** 2
        op = ln_op(c, gamma, beta, eps=eps, s_in=s_in, center=False,
                   s_out=math.sqrt(c) * np.abs(gamma).max() / 32767)
        assert op.attrs["eps"] == eps_int
        got = torch.from_numpy(run(op, x)).double() * float(op.scale)
        xr = torch.from_numpy(x).double() * s_in
        g = torch.from_numpy(gamma)
        view = (1, c) + (1,) * (len(shape) - 2)
        ms = (xr * xr).mean(1, keepdim=True)
        if kind == "rms_norm":
            want = F.rms_norm(xr.movedim(1, -1), (c,), g, eps).movedim(-1, 1)
        else:
            want = F.normalize(xr, dim=1)
        xhat = xr / torch.sqrt(ms + eps)
        v = ms / s_in ** 2 * c * c + eps_int
        shift = torch.from_numpy(op.consts["shift"].astype(np.float64)).reshape(view)
        bound = g.abs().reshape(view) * (xhat.abs() * (1 / (8 * v.sqrt() - 1) + 2 ** -22 + 2 ** -29) + 2 ** -17) \
            + float(op.scale) * (0.5 + 2.0 ** -(shift + 1)) + 1e-12
        err = (got - want).abs()
        assert bool((err <= bound).all()), float((err - bound).max())


def _program(c, rank, bits, seed):
    """int8 image -> (16-bit: a requantize ->) layer_norm (-> flatten for rank 4): ranks 2 and 4."""
    rng = np.random.default_rng(seed)
    ops, src = [], "x"
    if rank == 2:
        ops.append(Op("flatten", ["x"], "flat", scale=np.asarray(0.05), lo=-128, hi=127))
        src = "flat"
    if bits == 16:
        ops.append(Op("requantize", [src], "wide", attrs={"lo": I16[0], "hi": I16[1]},
                      consts={"multiplier": np.asarray(255 << 22, np.int32), "shift": np.asarray(22, np.int32)},
                      scale=np.asarray(0.05 / 255), lo=I16[0], hi=I16[1]))
        src = "wide"
    s_in = 0.05 / (255 if bits == 16 else 1)
    n_ch = c if rank == 4 else c * 2 * 3
    ln = ln_op(n_ch, rng.uniform(-2, 2, n_ch), rng.uniform(-1, 1, n_ch), eps=1e-3, s_in=s_in,
               clamp=[(-128, 127), (0, 255), I16][seed % 3], src=src)
    ops.append(ln)
    out = ln.output
    if rank == 4:
        ops.append(Op("flatten", [out], "out", scale=ln.scale, lo=ln.lo, hi=ln.hi))
        out = "out"
    shape = (c, 2, 3)
    return IntegerProgram("x", shape, 0.05, ops, out, np.asarray(ln.scale)), shape


@pytest.mark.parametrize("c,rank,bits", [(20, 4, 16), (3, 4, 8), (7, 2, 16)])
def test_tvm_kernel_equals_the_executor(c, rank, bits):
    from hawq_ray.deploy import compile_program
    from hawq_ray.program.executor import run_program
    prog, shape = _program(c, rank, bits, seed=c)
    x = np.random.default_rng(1).integers(-128, 128, (3, *shape)).astype(np.int8)
    x[0] = 5                                                       # constant channels: variance 0
    model = compile_program(prog, batch=3, target="llvm")
    want = run_program(prog, torch.from_numpy(x)).numpy()
    assert np.array_equal(model(x), want)
    assert "layer_norm" in {k.get("path") for k in model.manifest["kernels"]}


@pytest.mark.parametrize("c,rank,bits", [(20, 4, 16), (3, 4, 8), (7, 2, 16)])
def test_onnx_converter_equals_the_executor(c, rank, bits, tmp_path):
    from hawq_ray.onnx.export import check_values, export_onnx
    prog, shape = _program(c, rank, bits, seed=c)
    export_onnx(prog, tmp_path / "ln.onnx", every_value=True)
    x = torch.randn(4, *shape) * 3
    x[0] = 0.25
    rows = check_values(tmp_path / "ln.onnx", prog, x)
    assert "layer_norm" in {r["op"] for r in rows}
    assert [r for r in rows if r["differing"]] == []
