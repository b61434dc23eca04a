"""One layer's kernel on its own: build, compile and time it (the latency profiler's entry point).

The kernels are the very ones the whole-model build calls (`graph.plan_kernels` returns them all, glue
included), so per-layer latencies add up to the model's.
"""
from __future__ import annotations

import numpy as np
import tvm

from hawq_ray.deploy import layout, vnni  # noqa: F401  (vnni registers the intrinsic)
from hawq_ray.deploy.amx import enable_amx
from hawq_ray.deploy.build import gpu_schedule
from hawq_ray.deploy.target import as_target, device_of
from hawq_ray.deploy.epilogue import Value
from hawq_ray.deploy.kernels import Kernel, conv2d_kernel, dense_kernel
from hawq_ray.contract import HawqError
from hawq_ray.program.program import Op


def default_requantize(channels: int, rank: int, out_bits: int = 8) -> Op:
    """A per-channel requantize + ReLU clamp to unsigned `out_bits`, as follows every conv of a model."""
    shape = (channels, 1, 1) if rank == 4 else (channels,)
    hi = (1 << out_bits) - 1
    return Op("requantize", ["z"], "q", attrs={"lo": 0, "hi": hi},
              consts={"multiplier": np.full(shape, 1 << 30, np.int32), "shift": np.full(shape, 40, np.int32)},
              lo=0, hi=hi)


def build_layer_kernel(op: Op, input_shape, target="llvm", steps=None, input_dtype: str | None = None) -> Kernel:
    """The kernel of a conv2d or dense op for an input of logical shape (N, C, H, W) or (N, I).

    `steps` are the elementwise ops fused after it (default: a per-channel requantize to uint8, the usual
    case); `input_dtype` defaults to int8 for a signed input (`x_signed`) and uint8 otherwise.
    """
    target = as_target(target)
    dtype = input_dtype or ("int8" if op.attrs.get("x_signed") else "uint8")
    shape = tuple(int(s) for s in input_shape)
    if op.op == "conv2d":
        if len(shape) != 4:
            raise HawqError(f"{op.layer}: conv2d input shape must be (N, C, H, W), got {shape}")
        x = Value(shape, dtype, layout.channel_block(shape[1]))
        steps = [default_requantize(len(op.consts["weight"]), 4)] if steps is None else steps
        return conv2d_kernel(op, x, steps, [], target)
    if op.op == "dense":
        if len(shape) != 2:
            raise HawqError(f"{op.layer}: dense input shape must be (N, I), got {shape}")
        steps = [] if steps is None else steps
        return dense_kernel(op, Value(shape, dtype, None), steps, [], target)
    raise HawqError(f"build_layer_kernel: {op.op!r} is not a layer (conv2d or dense)")


def compile_kernel(kernel: Kernel, target="llvm"):
    """A runtime module with `time_evaluator`; call it as mod(*inputs, *consts, out)."""
    target = as_target(target)
    mod = tvm.IRModule({"main": kernel.func.with_attr("global_symbol", "main")})
    if target.kind.name == "cuda":
        mod = gpu_schedule(mod, target)
    if kernel.notes.get("path") == "amx":
        enable_amx()          # this process's AMX tile data (an AMX kernel without it dies of SIGILL)
    return tvm.compile(mod, target=target).jit()


def kernel_args(kernel: Kernel, dev, seed: int = 0) -> list:
    """Random activations in their dtype's range, the kernel's real constants, and an empty output."""
    rng = np.random.default_rng(seed)
    args = []
    for v in kernel.inputs:
        info = np.iinfo(v.dtype)
        args.append(tvm.runtime.tensor(rng.integers(info.min, info.max, v.storage_shape,
                                                    endpoint=True).astype(v.dtype), dev))
    args += [tvm.runtime.tensor(np.ascontiguousarray(c), dev) for c in kernel.consts]
    args += [tvm.runtime.empty(o.storage_shape, o.dtype, dev) for o in kernel.outputs]
    return args


def time_kernel(kernel: Kernel, target="llvm", number: int = 10, repeat: int = 5, compiled=None) -> list:
    """Per-run milliseconds of `repeat` measurements (each the mean of `number` runs, after one warm-up run)."""
    target = as_target(target)
    mod = compiled or compile_kernel(kernel, target)
    dev = device_of(target)
    args = kernel_args(kernel, dev)
    mod(*args)
    res = mod.time_evaluator("main", dev, number=number, repeat=repeat)(*args)
    return [r * 1e3 for r in res.results]


def run_kernel(kernel: Kernel, inputs: list, target="llvm", compiled=None):
    """Run a kernel on logical-layout numpy inputs ((N, C, H, W) or (N, C)); returns the logical output
    (a list of them for a kernel with several outputs)."""
    target = as_target(target)
    mod = compiled or compile_kernel(kernel, target)
    dev = device_of(target)
    args = []
    for v, x in zip(kernel.inputs, inputs):
        x = np.asarray(x).astype(v.dtype)
        args.append(tvm.runtime.tensor(layout.to_blocked(x, v.block) if v.block else x, dev))
    args += [tvm.runtime.tensor(np.ascontiguousarray(c), dev) for c in kernel.consts]
    outs = [tvm.runtime.empty(o.storage_shape, o.dtype, dev) for o in kernel.outputs]
    mod(*args, *outs)
    res = [layout.from_blocked(t.numpy(), o.shape[1]) if o.block else t.numpy()
           for t, o in zip(outs, kernel.outputs)]
    return res[0] if len(res) == 1 else res


def kernel_signature(kernel: Kernel) -> str:
    """sha256 of the kernel's scheduled TIR (shapes, dtypes, schedule; not its name or constant values): equal
    for kernels that compile to the same code, stable across processes (disk caches are keyed by it)."""
    import hashlib
    func = kernel.func
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return hashlib.sha256(func.script().encode()).hexdigest()[:32]
