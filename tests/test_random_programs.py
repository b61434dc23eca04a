"""Random IntegerPrograms (hawq_ray.program.random), compiled by TVM and compared value by value with
the PyTorch integer executor; the executor in turn against the independent numpy reference.

A fixed third of the producer -> consumer pairs of the 27 op kinds (`PAIRS`, 708) is built: the 236 whose two kinds'
indices in OPS sum to a multiple of 3, so that every kind produces for at least 6 kinds and consumes from at least
7, in one program each; two in three on the host target (VNNI / AMX where the CPU has them) and one in three
compiled for AVX2 (haswell: the exact `vpmaddwd` / `vpmaddubsw` kernels). The sweep over every pair, and beyond,
on any targets: `python bench/random_programs.py --programs 2000 --target llvm,avx2,avx512`.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch

from hawq_ray.deploy import compile_program
from hawq_ray.analysis.verify import check_random_program
from hawq_ray.program.random import NARROWED, OPS, PAIRS, random_program
from hawq_ray.analysis.verify import compare_values, first_divergence
from hawq_ray.program.executor import run_program
from hawq_ray.program.program import Op
from numpy_reference import run_reference

SEEDS = [s for s, (p, c) in enumerate(PAIRS) if (OPS.index(p) + OPS.index(c)) % 3 == 0]
N_PROGRAMS = len(PAIRS)
def target_of(seed: int):
    return "avx2" if seed % 3 == 2 else "llvm"


@pytest.fixture(scope="module")
def results():
    seeds = SEEDS
    # TVM's code generation is single-threaded: both cores when this is the only test process, one beside another
    # xdist worker; fresh interpreters, not forks of this one
    workers = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(check_random_program, seeds, map(target_of, seeds)))


def test_every_random_program_compiles_and_matches_the_executor(results):
    bad = [(r["seed"], r["pair"], r["error"] or r["first"]) for r in results if r["error"] or r["differing"]]
    assert not bad, f"{len(bad)} of {len(results)} random programs differ or fail: {bad[:5]}"
    assert len(results) >= 200
    assert sum(r["values"] for r in results) > 5 * len(results)       # intermediate values compared, not one
    assert all(r["elements"] > 0 for r in results)


def test_random_programs_cover_every_producer_consumer_pair(results):
    focus = Counter(r["pair"] for r in results)
    built = {PAIRS[s] for s in SEEDS}
    assert set(focus) == built and min(focus.values()) >= 1
    assert min(Counter(p for p, _ in built).values()) >= 6 and min(Counter(c for _, c in built).values()) >= 7
    assert {p for p, _ in built} == {c for _, c in built} == set(OPS)
    seen = set().union(*(map(tuple, r["pairs"]) for r in results))
    via = set().union(*(map(tuple, r["pairs_via_requantize"]) for r in results))
    assert {p for p in built if p[1] not in NARROWED} <= seen
    # a lookup, a product or a layer reads each producer directly or through the requantize in front of it
    assert {p for p in built if p[1] in NARROWED} <= seen | via
    # every op kind both produces and consumes; the only pairs missing are the rank-impossible ones
    rank4 = ("conv2d", "sum_pool2d", "max_pool2d", "channel_shuffle", "slice", "resize", "channel_gather")
    impossible = {(p, c) for p in ("dense", "flatten") for c in rank4} | {(p, "dense") for p in rank4}
    assert len(PAIRS) == len(OPS) ** 2 - len(impossible) and not (set(PAIRS) & impossible)


def test_random_programs_exercise_every_kernel_kind(results):
    paths = Counter(p for r in results for p in r["paths"])
    flags = set(open("/proc/cpuinfo").read().split())
    conv_path = "vnni" if "avx512_vnni" in flags else "generic"
    wanted = {conv_path, "generic", "grouped", "depthwise", "concat", "sum_pool2d", "max_pool2d", "flatten", "elementwise",
              "channel_shuffle", "slice", "channel_gather", "resize", "pad", "crop", "layer_norm",
              f"{conv_path}+max_pool"}
    if {"amx_int8", "amx_tile"} <= flags:
        wanted.add("amx")
    assert wanted <= set(paths), f"kernel paths never used: {wanted - set(paths)}"
    assert sum(r["wide"] for r in results) >= 10          # 64..96-channel programs (AMX-sized concats)


def test_executor_matches_the_numpy_reference_on_random_programs():
    """The executor is the reference TVM is held to; here it is held to the independent numpy one (int64
    loops over windows and taps), on every value of a third of the programs."""
    for seed in range(0, N_PROGRAMS, 3):
        rp = random_program(seed)
        prog = replace(rp.program, ops=[_with_clamp_attrs(op) for op in rp.program.ops])
        _, got = run_program(prog, torch.from_numpy(rp.inputs[1]), record=True)
        want = run_reference(prog, rp.inputs[1])
        for op in prog.ops:
            assert np.array_equal(got[op.output].numpy(), want[op.output]), (seed, op.op, op.output)


def _with_clamp_attrs(op: Op) -> Op:
    """The numpy reference reads a requantize's clamp from its attributes, as the docstring states it."""
    return replace(op, attrs={**op.attrs, "lo": op.lo, "hi": op.hi}) if op.op == "requantize" else op


def test_random_programs_stay_in_int32_and_are_not_degenerate():
    clamped, lively = 0, 0
    for seed in range(0, N_PROGRAMS, 2):
        rp = random_program(seed)
        _, values = run_program(rp.program, torch.from_numpy(rp.inputs[1]), record=True)
        for op in rp.program.ops:
            v = values[op.output]
            assert int(v.abs().max()) < 2 ** 31 and op.lo <= int(v.min()) and int(v.max()) <= op.hi
            if op.op == "requantize" and op.hi <= 255:
                clamped += 1
                lively += len(torch.unique(v)) > 3
    assert clamped > 50 and lively >= 0.9 * clamped


def test_compare_values_names_the_first_value_that_differs():
    """Compile a program, then hold it to a copy with one requantize's multiplier changed: the first
    divergence is that requantize's value, and the values before it agree."""
    rp = random_program(next(s for s in range(len(PAIRS)) if PAIRS[s] == ("concat", "requantize")))
    prog = rp.program
    model = compile_program(prog, batch=2, target="llvm", every_value=True)
    stored = [v["name"] for v in model.manifest["values"]]
    k = next(i for i, op in enumerate(prog.ops) if op.op == "requantize" and op.output in stored and op.hi <= 255)
    bumped = prog.ops[k]
    mult = np.asarray(bumped.consts["multiplier"]).astype(np.int64)
    ops = list(prog.ops)
    ops[k] = replace(bumped, consts={**bumped.consts, "multiplier": (mult * 3 // 4).astype(np.int32)})
    rows = compare_values(replace(prog, ops=ops), model, rp.inputs[0])
    first = first_divergence(rows)
    assert first is not None and first["value"] == bumped.output
    assert all(r["differing"] == 0 for r in rows[:[r["value"] for r in rows].index(bumped.output)])
    assert first_divergence(compare_values(prog, model, rp.inputs[0])) is None
