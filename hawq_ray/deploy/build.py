"""Whole-model compile, export and load.

    model = compile_program(program, batch=8, target="llvm")     # TVM module + params, in memory
    export_model(model, "out/")                                  # model.so, params.npz, manifest.json
    model = load_model("out/"); logits = model(x_int8)           # the three-line load (x: (N, C, H, W) int8)

Targets are parsed and checked by `deploy.target.parse_target` ("llvm", "cuda", a dict or its JSON).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import file_sha256
from hawq_ray.deploy import vnni  # noqa: F401  (registers the VNNI intrinsic)
from hawq_ray.deploy.amx import enable_amx
from hawq_ray.deploy.graph import build_relax, final_output, plan_kernels, stored_values
from hawq_ray.deploy.layout import from_blocked
from hawq_ray.deploy.target import device_of, parse_target, target_dict
from hawq_ray.program.program import IntegerProgram

MANIFEST_VERSION = 3    # 2: the SHA-256 of the library and the params, checked before loading; 3: the program's
LIBRARY, PARAMS, MANIFEST = "model.so", "params.npz", "manifest.json"


def gpu_schedule(mod, target, threads: int = 128):
    """CUDA: the kernels carry no CPU schedule; give every block of every PrimFunc a plain one, spatial loops
    fused and bound to blockIdx.x/threadIdx.x, reductions serial."""
    from tvm import s_tir
    out = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            out[gv] = func
            continue
        sch = s_tir.Schedule(func)
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(blk)
            n_spatial = sum(1 for iv in sch.get(blk).iter_vars if iv.iter_type == 0)   # data-parallel
            if not loops or n_spatial == 0:
                continue
            bx, tx = sch.split(sch.fuse(*loops[:n_spatial]), [None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        out[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)   # keep dlight's hands off
    return tvm.IRModule(out, attrs=mod.attrs)


@dataclass
class DeployedModel:
    """A compiled integer model: call it on an (N, C, H, W) int8 array to get the INT32 output (numpy)."""
    executable: object               # relax executable (export) or loaded runtime module
    params: list                     # [(name, numpy array)]
    manifest: dict
    target: tvm.target.Target
    _vm: object = field(default=None, repr=False)
    _args: list = field(default=None, repr=False)
    _main: object = field(default=None, repr=False)
    _probe: object = field(default=None, repr=False)     # call_ms's input, drawn once

    def _ready(self):
        if self._vm is None:
            # TVM's CPU thread pool has one thread unless TVM_NUM_THREADS is set before its first use
            os.environ.setdefault("TVM_NUM_THREADS", str(self.target.attrs.get("num-cores", os.cpu_count() or 1)))
            if any(k.get("path") == "amx" for k in self.manifest.get("kernels", [])) and not enable_amx():
                raise HawqError("this model's kernels use Intel AMX, which this process may not use "
                                "(arch_prctl ARCH_REQ_XCOMP_PERM refused); compile it again on this machine")
            dev = device_of(self.target)
            self._vm = relax.VirtualMachine(self.executable, dev)
            self._args = [tvm.runtime.tensor(a, dev) for _, a in self.params]
            self._main = self._vm["main"]            # looked up once: the lookup costs a tenth of a small model
        return self._vm

    def __call__(self, x) -> np.ndarray:
        out = self._run(x)
        return (out[0] if self.manifest.get("values") else out).numpy()

    def _run(self, x):
        self._ready()
        x = np.ascontiguousarray(np.asarray(x.numpy() if hasattr(x, "numpy") else x))
        shape, dtype = tuple(self.manifest["input_shape"]), self.manifest["input_dtype"]
        if x.shape != shape or str(x.dtype) != dtype:
            raise HawqError(f"input of shape {x.shape} {x.dtype}: this model takes {shape} {dtype}")
        return self._main(tvm.runtime.tensor(x, device_of(self.target)), *self._args)

    def values(self, x) -> dict:
        """{value name: array in the program's logical layout (NCHW or (N, C))} of every value a kernel
        stores, for a model compiled with `every_value=True`."""
        if not self.manifest.get("values"):
            raise HawqError("this model returns its output only: compile it with every_value=True")
        out = self._run(x)
        return {v["name"]: _logical(out[k + 1].numpy(), v) for k, v in enumerate(self.manifest["values"])}

    def call_ms(self, number: int = 1) -> float:
        """Mean ms of `number` back-to-back calls as a user makes them, `model(x)` on a fixed random input:
        the input's copy in and the output's copy out included."""
        if self._probe is None:
            self._probe = np.random.default_rng(0).integers(-128, 128, size=self.manifest["input_shape"],
                                                            dtype=np.int8)
        t0 = time.perf_counter()
        for _ in range(number):
            self(self._probe)
        return (time.perf_counter() - t0) / number * 1e3

    def time_ms(self, number: int = 5, repeat: int = 5) -> list:
        """TVM's time_evaluator of the module's main function alone (what the kernel profiler times)."""
        vm = self._ready()
        dev = device_of(self.target)
        x = tvm.runtime.tensor(np.zeros(self.manifest["input_shape"], self.manifest["input_dtype"]), dev)
        res = vm.time_evaluator("main", dev, number=number, repeat=repeat)(x, *self._args)
        return [r * 1e3 for r in res.results]


def _logical(stored: np.ndarray, value: dict) -> np.ndarray:
    return from_blocked(stored, value["shape"][1]) if value["block"] else stored


def compile_program(program: IntegerProgram, batch: int = 8, target="llvm", check: bool = True,
                    every_value: bool = False) -> DeployedModel:
    """With `every_value`, the module also returns every value its kernels store (`DeployedModel.values`):
    the same kernels, for locating a difference from the integer executor."""
    target = parse_target(target, check=check)
    return compile_calls(program, plan_kernels(program, batch, target), batch, target, every_value)


def compile_calls(program: IntegerProgram, calls: list, batch: int, target, every_value: bool = False) -> DeployedModel:
    """The module of kernel calls already planned for `target` (`graph.plan_kernels`)."""
    mod, params = build_relax(program, calls, batch, every_value)
    if target.kind.name == "cuda":
        mod = gpu_schedule(mod, target)
    ex = tvm.compile(mod, target=target)
    out = final_output(program, calls)[1]
    manifest = {
        "format": MANIFEST_VERSION, "library": LIBRARY, "params": PARAMS,
        "input_name": program.input_name, "input_shape": [batch, *program.input_shape], "input_dtype": "int8",
        "input_scale": float(program.input_scale), "output_name": program.output,
        "output_shape": list(out.storage_shape), "output_dtype": out.dtype,
        "output_scale": np.asarray(program.output_scale, dtype=np.float64).reshape(-1).tolist(),
        "bits": dict(program.bits), "program_sha256": program.fingerprint(), "target": target_dict(target),
        "tvm": tvm.__version__,
        "param_names": [n for n, _ in params],
        "kernels": [{"name": c.kernel.name, **c.kernel.notes} for c in calls],
    }
    if every_value:
        manifest["values"] = [{"name": name, "shape": list(v.shape), "block": v.block, "dtype": v.dtype,
                               "kernel": c.kernel.name, "layer": c.kernel.notes.get("layer")}
                              for name, v, c in stored_values(calls)]
    return DeployedModel(ex, params, manifest, target)


def export_model(model: DeployedModel, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.executable.export_library(str(out / LIBRARY))
    np.savez(out / PARAMS, **{f"p{i}": a for i, (_, a) in enumerate(model.params)})
    model.manifest.update(library_sha256=file_sha256(out / LIBRARY), params_sha256=file_sha256(out / PARAMS))
    (out / MANIFEST).write_text(json.dumps(model.manifest, indent=1))
    return out


_REQUIRED = ("format", "library", "params", "input_shape", "input_dtype", "output_shape", "target", "param_names",
             "library_sha256", "params_sha256", "program_sha256")


def read_manifest(out_dir) -> dict:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise HawqError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise HawqError(f"{path}: corrupt manifest (invalid JSON at line {e.lineno})") from None
    if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(manifest, dict) or k not in manifest]
        raise HawqError(f"{path}: corrupt manifest (missing {', '.join(missing)})")
    if manifest["format"] != MANIFEST_VERSION:
        raise HawqError(f"{path}: manifest format {manifest['format']!r}, this version reads {MANIFEST_VERSION}")
    return manifest


def load_model(out_dir, check: bool = True, program: IntegerProgram | None = None) -> DeployedModel:
    """The compiled model in `out_dir`. Its library is native code and runs when loaded: only a library inside
    the folder whose bytes have the manifest's SHA-256 is loaded (from a private copy, so it cannot change
    between the check and the load). Load only folders from a source you trust. With `program`, a module built
    from another program is refused before anything is loaded."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    if program is not None and manifest["program_sha256"] != program.fingerprint():
        raise HawqError(f"{out}: built from another integer program than the one given (program SHA-256 "
                        f"{str(manifest['program_sha256'])[:12]}..., not {program.fingerprint()[:12]}...); compile it again")
    target = parse_target(manifest["target"], check=check)
    library = _own_file(out, manifest, "library")
    params = _own_file(out, manifest, "params")
    try:
        with tempfile.TemporaryDirectory() as private:
            copy = Path(private) / LIBRARY
            shutil.copyfile(library, copy)
            _check_sha256(copy, manifest["library_sha256"], library)
            lib = tvm.runtime.load_module(str(copy))
        _check_sha256(params, manifest["params_sha256"], params)
        with np.load(params, allow_pickle=False) as z:
            arrays = [z[f"p{i}"] for i in range(len(manifest["param_names"]))]
    except HawqError:
        raise
    except Exception as e:  # a missing or truncated file
        raise HawqError(f"{out}: cannot load the compiled model ({str(e).strip().splitlines()[-1][:200]})") from None
    return DeployedModel(lib, list(zip(manifest["param_names"], arrays)), manifest, target)


def _own_file(out: Path, manifest: dict, key: str) -> Path:
    """The file the manifest names under `key`, refused unless it is a plain file directly inside `out`."""
    name = manifest[key]
    path = out / str(name)
    ok = isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
    if not ok or path.is_symlink() or path.resolve().parent != out.resolve():
        raise HawqError(f"{out / MANIFEST}: {key} {name!r} is not a file of this folder; a compiled model loads "
                        f"only its own files")
    return path


def _check_sha256(path: Path, expected, named: Path) -> None:
    if file_sha256(path) != expected:
        raise HawqError(f"{named}: its SHA-256 is not the manifest's; the file was changed after export "
                        f"(recompile it)")
