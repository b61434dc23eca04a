"""A ReLU or clamp before a requantize folds into the requantize's own clamp at a kernel's tile
(`deploy.epilogue.fold_clamps`), exactly: checked here against numpy on every integer the accumulator can
take near the bounds, and left alone where the folded bounds would differ per channel."""
from __future__ import annotations

import numpy as np

from hawq_ray.deploy.folds import fold_clamps
from hawq_ray.program.program import Op
from numpy_reference import ref_requantize

C = 8


def requantize_op(rng, lo=0, hi=255, per_channel=True):
    shape = (C, 1, 1) if per_channel else ()
    return Op("requantize", ["c"], "q", attrs={"lo": lo, "hi": hi}, lo=lo, hi=hi,
              consts={"multiplier": rng.integers(1 << 30, 1 << 31, shape).astype(np.int32),
                      "shift": rng.integers(38, 41, shape).astype(np.int32)})


def numpy_chain(z, steps):
    for op in steps:
        if op.op == "relu":
            z = np.maximum(z, 0)
        elif op.op == "clamp":
            z = np.clip(z, op.consts["lo"], op.consts["hi"])
        else:
            z = ref_requantize(z, op.consts["multiplier"], op.consts["shift"], op.attrs["lo"], op.attrs["hi"])
    return z


def accumulators(rng, near):
    """int32 accumulators of shape (4, C, 16, 16): random, plus every integer within 3 of each bound."""
    z = rng.integers(-(1 << 24), 1 << 24, (4, C, 16, 16)).astype(np.int64)
    flat = z.reshape(4, C, -1)
    for c in range(C):
        pts = np.concatenate([np.arange(v - 3, v + 4) for v in np.atleast_1d(near[c] if np.ndim(near) else near)])
        flat[0, c, :len(pts)] = pts
    return z


def test_relu6_folds_and_the_result_is_the_same():
    rng = np.random.default_rng(0)
    rq = requantize_op(rng)
    # ReLU6 on the accumulator: a per-channel integer bound whose image, 300 to 400, is past the
    # requantize's 255 (the next layer's range holds what ReLU6 passes)
    m = rq.consts["multiplier"].astype(np.float64) / np.exp2(rq.consts["shift"])
    six = np.floor(rng.uniform(300, 400, (C, 1, 1)) / m).astype(np.int32)
    clamp = Op("clamp", ["z"], "c", consts={"lo": np.zeros((C, 1, 1), np.int32), "hi": six})
    folded = fold_clamps([clamp, rq])
    assert len(folded) == 1 and folded[0].op == "requantize" and folded[0].inputs == ["z"]
    z = accumulators(rng, six.reshape(-1))
    assert np.array_equal(numpy_chain(z, folded), numpy_chain(z, [clamp, rq]))


def test_relu_folds_into_a_signed_requantize():
    rng = np.random.default_rng(1)
    rq = requantize_op(rng, lo=-128, hi=127)
    relu = Op("relu", ["z"], "c")
    folded = fold_clamps([relu, rq])
    assert len(folded) == 1 and (folded[0].attrs["lo"], folded[0].attrs["hi"]) == (0, 127)
    z = accumulators(rng, 0)
    assert np.array_equal(numpy_chain(z, folded), numpy_chain(z, [relu, rq]))


def test_bounds_that_differ_per_channel_are_not_folded():
    rng = np.random.default_rng(2)
    rq = requantize_op(rng, per_channel=False)
    hi = (np.arange(C) * 1000 + 5000).astype(np.int32).reshape(C, 1, 1)    # images 0.. well inside [0, 255]
    rq.consts["multiplier"], rq.consts["shift"] = np.array(1 << 30, np.int32), np.array(36, np.int32)
    clamp = Op("clamp", ["z"], "c", consts={"lo": np.zeros((C, 1, 1), np.int32), "hi": hi})
    assert fold_clamps([clamp, rq]) == [clamp, rq]
