"""Checks of the independent numpy int64 reference of tests/numpy_reference.py against hand-worked numbers and
torch (float64, exact for these small integers), and of its test programs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from numpy_reference import make_program, ref_conv2d, ref_pool, ref_requantize, run_reference


# ------------------------------------------------------------------------------------ checks of the reference

def test_requantize_hand_worked():
    # z * b / 2^c = 10 * 3 / 4 = 7.5 -> rounds half up to 8; -10 * 3 / 4 = -7.5 -> -7; clamp to [0, 255]
    assert ref_requantize(np.array([10, -10]), 3, 2, -100, 100).tolist() == [8, -7]
    assert ref_requantize(np.array([1000]), 3, 2, 0, 255).tolist() == [255]


def test_conv_and_pools_match_torch():
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (2, 4, 9, 9))
    w = rng.integers(-128, 128, (6, 2, 3, 3))
    b = rng.integers(-100, 100, 6)
    got = ref_conv2d(x, w, b, (2, 1), (1, 2), (1, 2), groups=2)
    want = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                      torch.tensor(b, dtype=torch.float64), (2, 1), (1, 2), (1, 2), 2)
    assert np.array_equal(got, want.numpy().astype(np.int64))
    for ceil_mode in (False, True):
        t = torch.tensor(x, dtype=torch.float64)
        mx = torch.nn.functional.max_pool2d(t, 3, 2, 1, ceil_mode=ceil_mode).numpy()
        assert np.array_equal(ref_pool(x, "max", (3, 3), (2, 2), (1, 1), ceil_mode=ceil_mode), mx)
        av = torch.nn.functional.avg_pool2d(t, 3, 2, 1, ceil_mode=ceil_mode, divisor_override=1).numpy()
        assert np.array_equal(ref_pool(x, "sum", (3, 3), (2, 2), (1, 1), ceil_mode=ceil_mode), av)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_make_program_is_nontrivial(w_bits):
    prog, x = make_program(w_bits=w_bits, act_hi=15 if w_bits == 4 else 255)
    env = run_reference(prog, x)
    for op in prog.ops:
        v = env[op.output]
        assert op.lo <= v.min() and v.max() <= op.hi, op.output
        if op.op == "requantize":
            assert len(np.unique(v)) > 3, op.output    # calibrated: not all clamped
    assert env[prog.output].shape == (2, 10)
