"""The integer executor's arithmetic against independent references: exact products on each of its three GEMM
paths (float32, float64, int64) against numpy int64, and pooling (ceil mode, dilation) against torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hawq_ray.program.executor import run_op
from hawq_ray.program.integer import FLOAT32_EXACT, FLOAT64_EXACT, exact_dtype, int_matmul
from hawq_ray.program.program import Op
from numpy_reference import ref_conv2d


def test_exact_dtype_follows_the_bound():
    w = torch.tensor([[3, -4, 1], [1, 1, 1]])          # max row sum of |w|: 8
    assert exact_dtype((FLOAT32_EXACT - 1) // 8, w) == torch.float32
    assert exact_dtype(FLOAT32_EXACT // 8, w) == torch.float64
    assert exact_dtype((FLOAT64_EXACT - 1) // 8, w) == torch.float64
    assert exact_dtype(FLOAT64_EXACT // 8, w) == torch.int64


@pytest.mark.parametrize("magnitude,path", [(255, torch.float32), (1 << 22, torch.float64), (1 << 58, torch.int64)])
def test_int_matmul_is_exact_on_each_path(magnitude, path):
    """Values that make the float32 path's bound hold exactly, and ones that need float64 and int64: each
    product equals numpy's int64 product (Python integers where int64 would wrap are not needed: the
    executor's values are INT32, and |x| * sum|w| < 2^63 here)."""
    rng = np.random.default_rng(magnitude % 97)
    x = rng.integers(-magnitude, magnitude + 1, (37, 300))
    w = rng.integers(-128, 128, (19, 300))
    if path == torch.float32:                      # push the bound just under 2^24
        w = np.clip(w, -1, 1) * (FLOAT32_EXACT // (magnitude * 300 + 1) // 1)
    if path == torch.int64:
        w = np.clip(w, -1, 1)
        x = x // 300
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    assert exact_dtype(int(xt.abs().max()), wt) == path
    got = int_matmul(xt, wt).numpy()
    assert np.array_equal(got, x.astype(object) @ w.T.astype(object))


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("magnitude", [255, 1 << 20])
def test_conv2d_matches_numpy(groups, magnitude):
    rng = np.random.default_rng(groups)
    x = rng.integers(-magnitude, magnitude + 1, (2, 8, 9, 7))
    w = rng.integers(-128, 128, (16, 8 // groups, 3, 3))
    b = rng.integers(-1000, 1000, 16)
    attrs = {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "groups": groups}
    op = Op("conv2d", ["x"], "y", attrs=attrs, consts={"weight": w.astype(np.int8), "bias": b.astype(np.int32)})
    got = run_op(op, [torch.from_numpy(x)]).numpy()
    want = ref_conv2d(x, w, b, attrs["stride"], attrs["padding"], attrs["dilation"], groups)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dilation", [1, 2])
def test_pools_match_torch(ceil_mode, dilation):
    """Output sizes and values of max and sum pooling, ceil mode and dilation included, against torch."""
    rng = np.random.default_rng(dilation)
    checked = 0
    for h, w in ((5, 6), (6, 14), (7, 7), (9, 4)):
        x = torch.from_numpy(rng.integers(-1000, 1000, (2, 3, h, w)))
        for k, s, p in ((2, 3, 1), (3, 2, 1), (2, 1, 0), (3, 3, 0)):
            if dilation * (k - 1) + 1 > min(h, w) + 2 * p:
                continue
            attrs = {"kernel": (k, k), "stride": (s, s), "padding": (p, p), "dilation": (dilation, dilation),
                     "ceil_mode": ceil_mode}
            got = run_op(Op("max_pool2d", ["x"], "y", attrs=attrs), [x])
            want = F.max_pool2d(x.double(), k, s, p, dilation, ceil_mode)
            assert torch.equal(got, want.to(torch.int64)), (h, w, k, s, p)
            if dilation == 1:
                got = run_op(Op("sum_pool2d", ["x"], "y", attrs=attrs), [x])
                want = F.avg_pool2d(x.double(), k, s, p, ceil_mode, count_include_pad=True, divisor_override=1)
                assert torch.equal(got, want.round().to(torch.int64)), (h, w, k, s, p)
            checked += 1
    assert checked >= 12
