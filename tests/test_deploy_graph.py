"""Whole programs through the TVM back end: bit-exact against the numpy reference, export/load, bad input."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hawq_ray.deploy import compile_program, export_model, load_model, parse_target
from hawq_ray.deploy.graph import conv_pools, plan_groups, plan_kernels
from hawq_ray.analysis.verify import compare, compare_batches, random_inputs
from hawq_ray.contract import HawqError
from hawq_ray.program.program import IntegerProgram, Op
from hawq_ray.program.rewrites import merge_equal_requantizes, requantize_before_max_pool
from numpy_reference import apply_op, make_program, run_reference

GENERIC = {"kind": "llvm", "mcpu": "skylake"}


@pytest.fixture(scope="module")
def programs():
    mixed_bits = {"block.conv1": 4, "block.conv2": 8, "block.down": 8, "branch.conv": 4}
    out = {"uniform8": make_program(8, 255), "uniform4": make_program(4, 15)}
    prog, x = make_program(8, 255, seed=2)
    for op in prog.ops:        # mixed: requantize the 4-bit layers' weights to [-8, 7]
        if op.layer in mixed_bits and mixed_bits[op.layer] == 4:
            op.consts["weight"] = (op.consts["weight"] >> 4).astype(np.int8)
            op.attrs["w_bits"] = 4
    out["mixed"] = (prog, x)
    return out


@pytest.mark.parametrize("config", ["uniform8", "uniform4", "mixed"])
@pytest.mark.parametrize("target", ["llvm", GENERIC], ids=["host", "generic"])
def test_program_bit_exact(programs, config, target):
    prog, x = programs[config]
    model = compile_program(prog, batch=2, target=target)
    ref = lambda batch: run_reference(prog, batch)[prog.output]
    result = compare_batches(model, ref, [x, *random_inputs(x.shape, 2, seed=1)])
    assert result.differing == 0 and result.elements == 3 * 2 * 10
    assert np.abs(ref(x)).max() > 1000     # the logits are not trivially zero


def test_one_kernel_per_layer_and_layout_changes_at_edges(programs):
    prog, _ = programs["uniform8"]
    calls = plan_kernels(prog, 2, parse_target("llvm"))
    names = [c.kernel.name for c in calls]
    assert names[0] == "input_to_blocked" and sum("blocked" in n for n in names) == 1
    layers = [c for c in calls if c.kernel.name.startswith(("conv2d_", "dense_"))]
    assert len(layers) == len(prog.layers())
    # requantize and the residual add/relu ride inside the conv kernels: the add has no kernel of its own
    assert not any(n.startswith(("add_", "relu_")) for n in names)


def test_fusion_plan():
    """A value read by several ops is stored by its kernel unless every reader is a requantize, which then
    become outputs of that kernel (fan-out); the stem's INT32 max pool is fused into the stem conv's kernel."""
    prog, _ = make_program(8, 255)
    from hawq_ray.deploy.graph import planned_ops
    ops = planned_ops(prog)
    pool = next(o for o in ops if o.op == "max_pool2d")
    assert next(o for o in ops if o.output == pool.inputs[0]).op == "relu"    # not moved: it is fused
    groups = plan_groups(prog, ops)
    produced = {name for g in groups for name in g.outputs}
    readers = {}
    for op in ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    fanned = [g for g in groups if g.fanout]
    assert len(fanned) == 1 and len(fanned[0].outputs) == 2
    for name, rs in readers.items():
        if len(rs) > 1 and name != "x":
            assert name in produced or all(r.op == "requantize" and r.output in produced for r in rs)
    stem = next(g for g in groups if g.anchor.layer == "stem")
    assert stem.pool is pool and [s.op for s in stem.post] == ["requantize"]
    assert not any(g.anchor.op == "max_pool2d" for g in groups)


def test_requantize_moves_before_a_max_pool_that_reads_no_conv():
    """concat -> max pool -> two narrow requantizes  ==>  each requantize, then its own pool (exact, checked
    against numpy on the rewritten op list); after a conv chain the pool is left for fusion."""
    rng = np.random.default_rng(2)
    q = lambda out, lo, hi: Op("requantize", ["p"], out, dict(lo=lo, hi=hi), dict(
        multiplier=rng.integers(1 << 29, 1 << 30, (2, 1, 1)).astype(np.int32), shift=np.full((2, 1, 1), 38)),
        lo=lo, hi=hi)
    pool = Op("max_pool2d", ["c"], "p", dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1),
                                             ceil_mode=False))
    ops = [Op("concat", ["a", "b"], "c", dict(axis=1)), pool, q("q1", 0, 255), q("q2", 0, 15),
           Op("concat", ["q1", "q2"], "out", dict(axis=1))]
    moved = requantize_before_max_pool(ops, "out", narrow={"q1", "q2"})
    assert [o.op for o in moved] == ["concat", "requantize", "max_pool2d", "requantize", "max_pool2d", "concat"]
    x = {"a": rng.integers(0, 1 << 20, (2, 1, 9, 9)), "b": rng.integers(0, 1 << 20, (2, 1, 9, 9))}
    for name, program in (("original", ops), ("moved", moved)):
        env = dict(x)
        for op in program:
            env[op.output] = apply_op(op, [env[i] for i in op.inputs])
        x[name] = env["out"]
    assert np.array_equal(x["original"], x["moved"]) and 0 < x["moved"].max()
    conv = Op("conv2d", ["x"], "c", dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
              dict(weight=np.ones((2, 2, 1, 1), np.int8)))
    after_conv = [conv, *ops[1:]]
    assert requantize_before_max_pool(after_conv, "out", {"q1", "q2"}, conv_pools(after_conv)) == after_conv


def test_equal_requantizes_of_one_value_are_computed_once():
    """Two requantizes of the block output with equal constants (each conv reading it has its own input
    quantizer, calibrated on the same tensor) become one stored value read by both convs; a requantize that
    differs in one multiplier, or in its clamp, stays; the compiled program matches numpy on every output."""
    prog, _ = make_program(8, 255)
    block = next(o for o in prog.ops if o.op == "relu" and sum(o.output in p.inputs for p in prog.ops) == 2)
    readers = [o for o in prog.ops if block.output in o.inputs]
    assert [o.op for o in readers] == ["requantize", "requantize"]
    first, second = readers
    i = prog.ops.index(second)
    for change, merged in ((None, True), ("multiplier", False), ("clamp", False)):
        twin = replace(second, consts={k: np.array(v, copy=True) for k, v in first.consts.items()},
                       attrs=dict(first.attrs), lo=first.lo, hi=first.hi)
        if change == "multiplier":
            twin.consts["multiplier"].reshape(-1)[0] += 1
        elif change == "clamp":
            twin.attrs["hi"] = twin.hi = int(first.attrs["hi"]) - 1
        ops = [*prog.ops[:i], twin, *prog.ops[i + 1:]]
        program = replace(prog, ops=ops)
        kept = merge_equal_requantizes(ops, program.output)
        assert (len(kept) == len(ops) - 1) == merged
        stored = {name for c in plan_kernels(program, 2, parse_target("llvm")) for name in c.outputs}
        assert (twin.output not in stored) == merged and first.output in stored
        x = np.random.default_rng(3).integers(-128, 128, (2, *program.input_shape)).astype(np.int8)
        got = compile_program(program, batch=2, target="llvm")(x)
        assert np.array_equal(got, run_reference(program, x)[program.output])


def test_export_load_roundtrip(programs, tmp_path):
    prog, x = programs["uniform4"]
    model = compile_program(prog, batch=2)
    out = export_model(model, tmp_path / "m")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_shape"] == [2, 3, 12, 12] and manifest["bits"]["block.conv1"] == 4
    loaded = load_model(out)
    assert compare(loaded(x), run_reference(prog, x)[prog.output]).differing == 0


def test_amx_model_runs_exported_in_a_fresh_process(tmp_path):
    """A program wide enough for the AMX path (128 channels at 14x14), exported, then loaded and run by a new
    Python process: `load_model` must obtain the tile data from Linux itself (else the process dies of
    SIGILL). Bit-exact against the numpy reference; on a CPU without AMX the same holds on VNNI."""
    import subprocess
    import sys
    prog, x = make_program(8, 255, batch=2, size=28, channels=(3, 128, 128))
    model = compile_program(prog, batch=2)
    flags = set(open("/proc/cpuinfo").read().split())
    paths = {k["path"] for k in model.manifest["kernels"]}
    assert ("amx" in paths) == ({"amx_int8", "amx_tile"} <= flags)
    out = export_model(model, tmp_path / "m")
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, sys; from hawq_ray.deploy import load_model; "
            "m = load_model(sys.argv[1]); np.save(sys.argv[3], m(np.load(sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "y.npy")
    assert compare(got, run_reference(prog, x)[prog.output]).differing == 0 and np.abs(got).max() > 0


def test_bad_inputs_raise_one_line_errors(programs, tmp_path):
    prog, x = programs["uniform8"]
    for bad in ({"kind": "llvm", "mcpu": "bogus"}, "cuda", "rocm", "not json {",
                {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}):
        with pytest.raises(HawqError) as e:
            parse_target(bad)
        assert "\n" not in str(e.value)
    out = export_model(compile_program(prog, batch=2), tmp_path / "m")
    (out / "manifest.json").write_text("{ not json")
    with pytest.raises(HawqError, match="corrupt manifest"):
        load_model(out)
    (out / "manifest.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(HawqError, match="missing"):
        load_model(out)
    with pytest.raises(HawqError):
        load_model(tmp_path / "nowhere")


def test_wrong_input_shape_is_rejected(programs):
    prog, x = programs["uniform8"]
    model = compile_program(prog, batch=2)
    with pytest.raises(HawqError, match="takes"):
        model(x[:1])


def test_depthwise_and_rank4_output():
    """A grouped conv and a program whose output is rank 4 (unblocked once at the end)."""
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (16, 1, 3, 3)).astype(np.int8)
    w0 = rng.integers(-128, 128, (16, 3, 1, 1)).astype(np.int8)
    ops = [Op("conv2d", ["x"], "a", dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, w_bits=8,
                                         x_signed=True), dict(weight=w0, bias=np.zeros(16, np.int32)), layer="c0"),
           Op("requantize", ["a"], "b", dict(lo=0, hi=255), dict(multiplier=np.array(1 << 30, np.int32),
                                                                  shift=np.array(36, np.int32)), lo=0, hi=255),
           Op("conv2d", ["b"], "c", dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=16, w_bits=8),
              dict(weight=w, bias=np.arange(16, dtype=np.int32)), layer="dw")]
    prog = IntegerProgram("x", (3, 6, 6), 0.1, ops, "c", np.ones(16))
    x = rng.integers(-128, 128, (2, 3, 6, 6)).astype(np.int8)
    got = compile_program(prog, batch=2)(x)
    assert np.array_equal(got, run_reference(prog, x)["c"])


def test_kernel_signatures_ignore_weights_and_tell_shapes_apart():
    """Same shapes, other weights: the same kernels (built and timed once by the profiler); another batch:
    other kernels."""
    from hawq_ray.deploy.layer import kernel_signature
    prog, _ = make_program(8, 255)
    other, _ = make_program(8, 255, seed=9)
    target = parse_target("llvm")
    sig = lambda p, n: [kernel_signature(c.kernel) for c in plan_kernels(p, n, target)]   # noqa: E731
    assert sig(prog, 2) == sig(other, 2)
    assert not set(sig(prog, 2)) & set(sig(prog, 3))


def test_cuda_module_builds(programs):
    """The CUDA path compiles (plain GPU schedule) on any machine; test_cuda_module_runs_bit_exact runs it where
    a GPU is present."""
    prog, _ = programs["uniform4"]
    model = compile_program(prog, batch=2, target={"kind": "cuda", "arch": "sm_75"}, check=False)
    assert model.manifest["target"]["kind"] == "cuda"
    assert all(k["path"] in ("gpu", "gpu+max_pool", "layout", "max_pool2d", "sum_pool2d", "concat", "flatten",
                             "elementwise")
               for k in model.manifest["kernels"])


def cuda_device_present() -> bool:
    import tvm
    return bool(tvm.cuda(0).exist)


@pytest.mark.skipif(not cuda_device_present(), reason="no CUDA device on this machine: the CUDA module is built "
                    "(test_cuda_module_builds) but cannot run here")
@pytest.mark.parametrize("config", ["uniform8", "uniform4", "mixed"])
def test_cuda_module_runs_bit_exact(programs, config):
    """On a GPU the CUDA module equals the numpy reference on every output element."""
    prog, x = programs[config]
    model = compile_program(prog, batch=2, target="cuda")
    ref = lambda batch: run_reference(prog, batch)[prog.output]   # noqa: E731
    result = compare_batches(model, ref, [x, *random_inputs(x.shape, 2, seed=1)])
    assert result.differing == 0 and result.elements == 3 * 2 * 10


@pytest.mark.parametrize("config", ["uniform8", "uniform4"])
def test_derived_ranges_hold_every_value(programs, config):
    """Interval arithmetic is sound on real data (extreme inputs too) and narrows the declared INT32 ranges."""
    from hawq_ray.program.ranges import narrow_ranges
    prog, x = programs[config]
    ops = narrow_ranges(prog)
    for batch in (x, np.full_like(x, 127), np.full_like(x, -128)):
        env = run_reference(prog, batch)
        for op in ops:
            assert op.lo <= env[op.output].min() and env[op.output].max() <= op.hi, op.output
    declared = {op.output: (op.lo, op.hi) for op in prog.ops}
    assert sum((op.lo, op.hi) != declared[op.output] for op in ops) >= 5
