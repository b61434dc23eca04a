"""Targets and what they can do, decided once: `parse_target` turns what a user gives into a TVM target (and
checks that this machine can run it), `capabilities` says which kernel paths it offers.

`target` is "llvm" (the host CPU, detected), "cuda", a TVM target dict, its JSON string, or the short name of
an x86 ISA (`ISA_CPUS`: avx2, avx512, avx512-vnni, amx), compiled for a representative LLVM CPU. A target
this machine cannot run raises HawqError unless `check=False` (to export for another machine).

Paths: AVX512-VNNI (`vpdpbusd`, u8 x s8 -> s32) on an llvm target whose CPU has it; Intel AMX (`tdpbusd`
tiles) where the CPU has amx-int8 and Linux grants this process the tile data; without VNNI, exact AVX-512BW
or AVX2 dot products (`x86dot.py`: `vpmaddwd`, or `vpmaddubsw` for narrow weights); a GPU schedule on cuda;
a generic vectorized schedule anywhere else.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import tvm

from hawq_ray.contract import HawqError

_ISA = ("avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni", "avx512vbmi", "avxvnni",
        "avx512bf16", "avx512fp16", "amx-tile", "amx-int8", "amx-bf16", "amx-fp16")
GPU_KINDS = ("cuda", "rocm", "vulkan", "metal", "opencl")
# the ISA a user deploys on, by name -> the oldest LLVM CPU that has it (code built for it runs on any later one)
ISA_CPUS = {"avx2": "haswell", "avx512": "skylake-avx512", "avx512-vnni": "cascadelake",
            "amx": "sapphirerapids"}


@dataclass(frozen=True)
class Capabilities:
    vnni: bool       # AVX512-VNNI dot products
    amx: bool        # AMX int8 tiles, usable by this process
    gpu: bool
    vbmi: bool = False   # AVX512-VBMI byte permutes (a 256-entry byte table in registers, `bytelut`)
    lanes: bool = False   # AVX2 or AVX-512: a requantize 16 int32 lanes at a time (`lanerequant`)
    avx2: bool = False    # 256-bit integer vectors: the exact `vpmaddwd` / `vpmaddubsw` dots (`x86dot`)
    avx512bw: bool = False  # the same dots on 512-bit vectors

    def conv_path(self, use_amx: bool, dot) -> str:
        """The label a conv / dense kernel's manifest entry carries (`dot`: its `x86dot.DotPath`, or None)."""
        return "amx" if use_amx else dot.label if dot else "gpu" if self.gpu else "generic"


def capabilities(target) -> Capabilities:
    return _capabilities(str(target))


@functools.lru_cache(maxsize=64)
def _capabilities(text: str) -> Capabilities:
    target = tvm.target.Target(json.loads(text))
    gpu = target.kind.name in GPU_KINDS
    if target.kind.name != "llvm":
        return Capabilities(False, False, gpu)
    from tvm.target.codegen import llvm_cpu_has_features

    from hawq_ray.deploy.amx import enable_amx
    def has(feature):
        return bool(llvm_cpu_has_features(feature, target))
    return Capabilities(has("avx512vnni"), has("amx-int8") and enable_amx(), gpu, has("avx512vbmi"),
                        has("avx512f") or has("avx2"), has("avx2"), has("avx512bw"))


def is_gpu(target) -> bool:
    """Whether a target (in any form parse_target reads) runs on a GPU, without checking this machine has one."""
    return parse_target(target, check=False).kind.name in GPU_KINDS


def host_cpu_features() -> set:
    from tvm.target.codegen import llvm_get_cpu_features, llvm_get_system_cpu
    feats = set(llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()})))
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        feats |= {f.replace("amx_", "amx-").replace("_", "") for f in flags.split(":", 1)[1].split()}
    except (OSError, StopIteration):
        pass
    return feats


def parse_target(spec="llvm", check: bool = True) -> tvm.target.Target:
    """'llvm' | 'cuda' | an ISA_CPUS name | dict | JSON string | Target -> Target; check that this machine can
    run it."""
    if isinstance(spec, tvm.target.Target):
        attrs = target_dict(spec)
    elif isinstance(spec, dict):
        attrs = dict(spec)
    else:
        text = str(spec).strip()
        try:
            attrs = json.loads(text) if text.startswith("{") else \
                {"kind": "llvm", "mcpu": ISA_CPUS[text.lower()]} if text.lower() in ISA_CPUS else {"kind": text}
        except json.JSONDecodeError as e:
            raise HawqError(f"target {text!r}: not valid JSON ({e.msg})") from None
    kind = attrs.get("kind")
    if kind not in ("llvm", "cuda"):
        raise HawqError(f"target {spec!r}: kind must be 'llvm' or 'cuda' (or an ISA: {', '.join(ISA_CPUS)})")
    if kind == "llvm":
        from tvm.target.codegen import llvm_get_system_cpu, llvm_get_system_triple, llvm_is_valid_cpu
        if "mcpu" not in attrs and "mattr" not in attrs and {"amx-tile", "amx-int8"} <= host_cpu_features():
            attrs["mattr"] = ["+amx-tile", "+amx-int8"]     # LLVM names this CPU without its AMX units
        attrs.setdefault("mcpu", llvm_get_system_cpu())
        attrs.setdefault("num-cores", os.cpu_count() or 1)
        if not llvm_is_valid_cpu(str(attrs["mcpu"]), str(attrs.get("mtriple", llvm_get_system_triple()))):
            raise HawqError(f"target llvm: unknown mcpu {attrs['mcpu']!r}")
    try:
        target = tvm.target.Target(attrs)
    except Exception as e:  # TVM raises several types for a bad attribute
        raise HawqError(f"target {spec!r}: {str(e).strip().splitlines()[-1]}") from None
    if check:
        _check_runnable(target)
    return target


def as_target(target) -> tvm.target.Target:
    """A Target as is; anything else through `parse_target`."""
    return target if isinstance(target, tvm.target.Target) else parse_target(target)


def _check_runnable(target):
    if target.kind.name == "cuda":
        if not tvm.cuda(0).exist:
            raise HawqError("target cuda: this machine has no CUDA device (use llvm, or check=False to export)")
        return
    from tvm.target.codegen import llvm_get_cpu_features, llvm_get_system_triple
    arch = str(target.attrs.get("mtriple", llvm_get_system_triple())).split("-")[0]
    if arch != llvm_get_system_triple().split("-")[0]:
        raise HawqError(f"target llvm -mtriple={target.attrs['mtriple']}: this machine is "
                        f"{llvm_get_system_triple().split('-')[0]} (use check=False to export)")
    lacking = sorted(f for f in set(llvm_get_cpu_features(target)) & set(_ISA) if f not in host_cpu_features())
    if lacking:
        raise HawqError(f"target llvm -mcpu={target.attrs['mcpu']}: this CPU lacks {', '.join(lacking)}")


def target_dict(target) -> dict:
    """The target as a plain JSON-able dict (kind and attributes), as the manifest stores it."""
    d = json.loads(str(target))
    return {k: v for k, v in d.items() if k not in ("tag", "keys") and v not in ("", None)}


def device_of(target):
    return tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
