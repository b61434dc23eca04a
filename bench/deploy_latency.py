"""End-to-end latency of the TVM integer-only deployment against torch fp32 eager, torch.ao int8 (x86 backend:
oneDNN), torchao's PT2E int8 (torch.export + X86InductorQuantizer, lowered by torch.compile/inductor: the successor
of torch.ao's deprecated FX quantization), onnxruntime int8 QDQ and OpenVINO int8 (NNCF's default post-training
quantization of the same model), all in one process, measured in interleaved rounds with a rotating order (so a
load spike on a shared machine hits every path alike) and a short pause before each path (--pause, so the previous
runtime's spinning worker threads go idle). In each round a path runs --calls times back to back and its mean call
is its sample: steady-state latency. The first call after a pause also pays for waking the runtime's threads and
refilling the caches the other runtimes evicted; --calls 1 measures that cold call alone. Prints a table of median
ms and ratios per model and batch, then TVM uniform8 against torch.ao, PT2E, onnxruntime and OpenVINO and, with
several batch sizes, the per-image cost of the largest batch over batch 1; --json prints one JSON object last.
torchao, OpenVINO and NNCF come with the `bench` extra (`pip install -e '.[bench]'`); a baseline that cannot be
built (e.g. PT2E where inductor finds no C++ compiler) is reported and skipped.

    python bench/deploy_latency.py [--models resnet18,resnet50] [--batch 1,8] [--rounds 7] [--calls 3]
                                   [--pause 0.05] [--verify] [--json] [--target avx2] [--baselines ...]

--target compiles TVM for a named ISA (`deploy.target.parse_target`: avx2, avx512, avx512-vnni, or a TVM target
JSON). When that ISA is older than this CPU's, the whole benchmark runs again in a subprocess whose environment
caps every runtime that has a switch at the same ISA (read when the libraries load; `cap_env`): oneDNN
(ONEDNN_MAX_CPU_ISA: torch's copy and OpenVINO's fork both honour it), ATen's and inductor's vector code
(ATEN_CPU_CAPABILITY, for an AVX2 or SSE4.1 cap) and OpenVINO's own JIT kernels (OV_CPU_MAX_ISA, which OpenVINO
wants set to the same value as ONEDNN_MAX_CPU_ISA). So torch fp32, torch.ao, PT2E and OpenVINO run as they would on
that CPU, still in one process with interleaved rounds (checked for OpenVINO 2026.4, resnet18 int8: the
primitiveType of its convolutions, poolings and input FakeQuantize in the execution graph reads avx2 under both
variables, avx512 without; ONEDNN_MAX_CPU_ISA alone leaves the FakeQuantize on avx512). onnxruntime has no such
switch: the table's `ISA` column says which rows were capped.

Issue 14's bars (uniform8, 224x224): TVM no slower than torch.ao int8 at batch 8 and batch 1; uniform4 within 10%
of uniform8; per-image time at batch 8 at most 0.75x that of batch 1 on resnet18. The rows `ORT hawq-ray u8
fused / exact` are hawq-ray's own ONNX export of uniform8 (`hawq-ray export --form fused | exact`) in
onnxruntime: the fused form should match onnxruntime's own quantizer within 10%.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hawq_ray.analysis.timing import interleaved_samples  # noqa: E402


def _timer(fn, inner: int):
    def run():
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner * 1e3
    return run


def torch_fp32(model, x, channels_last=False):
    m = model.eval()
    xx = x
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        xx = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            m(xx)
    return run


def torch_ao_int8(model, x, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), example_inputs=(x,))
    with torch.inference_mode():
        for c in calib:
            prepared(c)
    q = convert_fx(prepared)

    def run():
        with torch.inference_mode():
            q(x)
    return run


def pt2e_int8(model, x, calib):
    """torchao's PT2E int8: the exported graph annotated by X86InductorQuantizer's default config (per-channel int8
    weights, per-tensor uint8 activations), calibrated on `calib`, converted to quantize/dequantize pairs and
    lowered by inductor, which fuses them into oneDNN int8 convolutions and generates C++ for the rest."""
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    with torch.no_grad():   # inductor freezes only without grad; the guards then want every call without it
        prepared = prepare_pt2e(torch.export.export(model.eval(), (x,)).module(), quantizer)
        for c in calib:
            prepared(c)
        compiled = torch.compile(convert_pt2e(prepared))
        # Freezing folds the weights into constants, which the int8 fusion needs (without it the convolutions run
        # in fp32). Patched around the first call, which compiles: torch.compile(options={"freezing": True}) left
        # the weights as graph inputs here and the compile failed on onednn.qconv_prepack.
        with inductor_config.patch(freezing=True):
            compiled(x)

    def run():
        with torch.no_grad():
            compiled(x)
    return run


def ort_int8_qdq(model, x, calib, workdir):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    fp32 = os.path.join(workdir, "model.onnx")
    pre = os.path.join(workdir, "model.pre.onnx")
    q8 = os.path.join(workdir, "model.int8.onnx")
    torch.onnx.export(model.eval(), (x,), fp32, input_names=["x"], output_names=["y"], dynamo=False)
    try:
        with contextlib.chdir(workdir):     # its shape inference writes temporary files to the working folder
            quant_pre_process(fp32, pre)
    except Exception:  # pre-processing is an optimization only
        pre = fp32

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.it, None)
    quantize_static(pre, q8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(q8, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def openvino_int8(model, x, calib):
    """OpenVINO int8: the model converted to OpenVINO, NNCF's default post-training quantization (calibrated on
    `calib`), compiled for the CPU with a latency hint and every core."""
    import nncf
    import openvino as ov
    fp32 = ov.convert_model(model.eval(), example_input=x)
    q8 = nncf.quantize(fp32, nncf.Dataset([c.numpy() for c in calib]), subset_size=len(calib))
    compiled = ov.Core().compile_model(q8, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                   "INFERENCE_NUM_THREADS": os.cpu_count() or 1})
    request, feed = compiled.create_infer_request(), x.numpy()
    return lambda: request.infer({0: feed})


def mixed_bits(table):
    """4 bits for the layers of the second half of the network (groups follow their first member), else 8."""
    import pandas as pd
    rows = list(table.itertuples())
    half = len(rows) // 2
    bits, by_group = {}, {}
    for i, r in enumerate(rows):
        if not pd.isna(r.fixed_bits):
            bits[r.layer] = int(r.fixed_bits)
            continue
        b = 4 if i >= half else 8
        if isinstance(r.group, str) and r.group:
            b = by_group.setdefault(r.group, b)
        bits[r.layer] = b
    return bits


# oneDNN's name for the most it may use on a target with these `Capabilities` (checked newest first)
ONEDNN_CAPS = (("amx", "AVX512_CORE_AMX"), ("vnni", "AVX512_CORE_VNNI"), ("avx512bw", "AVX512_CORE"),
               ("avx2", "AVX2"))
CAP_ENV = "ONEDNN_MAX_CPU_ISA"
ATEN_CAPS = {"AVX2": "avx2", "SSE41": "default"}    # ATEN_CPU_CAPABILITY for a cap below ATen's avx512 kernels


TORCH_AO, PT2E, OPENVINO, ORT, UINT8 = ("torch.ao int8 (x86)", "torchao PT2E int8 (inductor)",
                                        "OpenVINO int8 (NNCF)", "onnxruntime int8 QDQ", "TVM int-only uniform8")
# the rows whose runtime the cap reaches, and which runtime that is
CAPPED = {"torch fp32 (NCHW)": "torch", "torch fp32 (channels_last)": "torch", TORCH_AO: "torch", PT2E: "torch",
          OPENVINO: "OpenVINO"}


def onednn_cap(target) -> str | None:
    """The ONEDNN_MAX_CPU_ISA value that restricts oneDNN to `target`'s ISA, or None when the target has every
    feature of this CPU that oneDNN's int8 kernels use (no cap needed)."""
    from hawq_ray.deploy.target import capabilities, parse_target
    want, host = capabilities(parse_target(target)), capabilities(parse_target("llvm"))
    older = any(getattr(host, f) and not getattr(want, f) for f, _ in ONEDNN_CAPS)
    return next((cap for f, cap in ONEDNN_CAPS if getattr(want, f)), "SSE41") if older else None


def cap_env(cap: str) -> dict:
    """The environment that caps oneDNN (torch's and OpenVINO's), OpenVINO's own kernels and, below AVX-512,
    ATen's and inductor's vector code at oneDNN ISA name `cap`."""
    env = {CAP_ENV: cap, "OV_CPU_MAX_ISA": cap}
    if cap in ATEN_CAPS:
        env["ATEN_CPU_CAPABILITY"] = ATEN_CAPS[cap]
    return env


def tvm_model(model, shape, bits, batch, calib, verify, target="llvm"):
    from hawq_ray.deploy import compile_program
    from hawq_ray.quant.qat import prepare
    qm = prepare(model, bits, shape).calibrate([c[:2] for c in calib[:2]])
    prog = qm.to_integer()
    t0 = time.perf_counter()
    deployed = compile_program(prog, batch=batch, target=target)
    compile_s = time.perf_counter() - t0
    xq = prog.quantize_input(calib[0]).numpy()
    deployed(xq)
    differing = None
    if verify:
        from hawq_ray.program.executor import run_program
        differing = int((deployed(xq) != run_program(prog, torch.from_numpy(xq)).numpy()).sum())
    return (lambda: deployed(xq)), compile_s, differing


def hawq_onnx(model, shape, bits, x, calib, form, workdir):
    """The config exported by hawq-ray as ONNX QDQ (`hawq-ray export`), run in onnxruntime."""
    from hawq_ray.onnx.export import export_onnx, onnx_session
    from hawq_ray.quant.qat import prepare
    program = prepare(model, bits, shape).calibrate([c[:2] for c in calib[:2]]).to_integer()
    path = os.path.join(workdir, f"hawq_{bits}_{form}.onnx")
    export_onnx(program, path, form=form)
    sess = onnx_session(path)
    feed = {"input": x.numpy()}
    return lambda: sess.run(None, feed)


def bench_model(name, batch, rounds, verify, configs, calls=3, pause=0.05, target="llvm",
                baselines=("torch", "ao", "pt2e", "ort", "openvino", "hawq-onnx")):
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.inputs.models import get_model, input_shape
    torch.manual_seed(0)
    model = get_model(name).eval()
    shape = tuple(input_shape(name))
    x = torch.randn(batch, *shape)
    calib = [torch.randn(batch, *shape) for _ in range(2)]
    runners, info = {}, {}
    runners["torch fp32 (NCHW)"] = torch_fp32(model, x)
    if "torch" in baselines:
        runners["torch fp32 (channels_last)"] = torch_fp32(get_model(name).eval(), x, channels_last=True)
    for key, label, make in (("ao", TORCH_AO, lambda: torch_ao_int8(get_model(name), x, calib)),
                             ("pt2e", PT2E, lambda: pt2e_int8(get_model(name), x, calib)),
                             ("ort", ORT, lambda: ort_int8_qdq(get_model(name), x, calib, tempfile.mkdtemp())),
                             ("openvino", OPENVINO, lambda: openvino_int8(get_model(name), x, calib))):
        if key not in baselines:
            continue
        try:
            runners[label] = make()
        except Exception as e:  # a baseline that cannot be built here is reported, not fatal
            why = " ".join(str(e).split())[:120]    # one line: inductor's messages span several
            print(f"# {name}: {label} unavailable: {type(e).__name__}: {why}", file=sys.stderr)
    for form in ("fused", "exact") if "hawq-onnx" in baselines else ():   # hawq-ray's ONNX export, in ORT
        runners[f"ORT hawq-ray u8 {form}"] = hawq_onnx(model, shape, "uniform8", x, calib, form,
                                                           tempfile.mkdtemp())
    table = layer_table(model, shape)
    for cfg in configs:
        bits = mixed_bits(table) if cfg == "mixed" else cfg
        run, compile_s, differing = tvm_model(model, shape, bits, batch, calib, verify, target)
        runners[f"TVM int-only {cfg}"] = run
        info[f"TVM int-only {cfg}"] = {"compile_s": round(compile_s, 1), "differing": differing}
    for run in runners.values():     # warm-up
        run()
    samples = interleaved_samples({k: _timer(v, calls) for k, v in runners.items()}, rounds, pause)
    return {k: {"median_ms": float(np.median(v)), **info.get(k, {})} for k, v in samples.items()}


def print_rows(name, batch, rows, args):
    fp32 = rows["torch fp32 (NCHW)"]["median_ms"]
    ort = rows.get(ORT, {}).get("median_ms")
    ao = rows.get(TORCH_AO, {}).get("median_ms")
    u8 = rows.get(UINT8, {}).get("median_ms")
    cap = os.environ.get(CAP_ENV)
    print(f"\n{name}, batch {batch}, {os.cpu_count()} threads, "
          f"median of {args.rounds} rounds x mean of {args.calls} calls; TVM target {args.target}; load average "
          f"{os.getloadavg()[0]:.1f} at the end (other processes share the cores)"
          + (f"; capped at {cap} ({', '.join(f'{k}={v}' for k, v in cap_env(cap).items())})" if cap else ""))
    print(f"{'path':30s} {'ISA':>22s} {'median ms':>10s} {'fp32/x':>8s} {'x/ORT':>7s} {'x/ao':>6s} {'x/u8':>6s} "
          f"{'compile s':>9s} {'diff':>5s}")
    for k, r in rows.items():
        ms = r["median_ms"]
        isa = f"TVM {args.target}" if k.startswith("TVM") else f"{CAPPED[k]}<={cap}" if cap and k in CAPPED else "host"
        print(f"{k:30s} {isa:>22s} {ms:10.1f} {fp32 / ms:8.2f} {ms / ort if ort else float('nan'):7.2f} "
              f"{ms / ao if ao else float('nan'):6.2f} "
              f"{ms / u8 if u8 and k.startswith('TVM') else float('nan'):6.2f} "
              f"{r.get('compile_s', ''):>9} {'' if r.get('differing') is None else r['differing']:>5}")


def print_summary(results, batches):
    """TVM uniform8 against torch.ao, PT2E, onnxruntime and OpenVINO per model and batch, and the per-image cost of the
    largest batch over that of batch 1 (the bars: TVM / torch.ao and TVM / onnxruntime <= 1; per-image ratio
    <= 0.75)."""
    def ms(rows, key):
        return rows.get(key, {}).get("median_ms", float("nan"))
    print(f"\n{'model':26s}{'batch':>6s}{'torch.ao':>10s}{'PT2E':>8s}{'ORT':>8s}{'OpenVINO':>10s}{'TVM u8':>9s}"
          f"{'TVM/ao':>8s}{'TVM/PT2E':>9s}{'TVM/ORT':>8s}{'TVM/OV':>8s}")
    for name, per_batch in results.items():
        for b in batches:
            rows = per_batch[b]
            tvm, ao, pt2e = ms(rows, UINT8), ms(rows, TORCH_AO), ms(rows, PT2E)
            ort, ov = ms(rows, ORT), ms(rows, OPENVINO)
            print(f"{name:26s}{b:6d}{ao:10.1f}{pt2e:8.1f}{ort:8.1f}{ov:10.1f}{tvm:9.1f}{tvm / ao:8.2f}"
                  f"{tvm / pt2e:9.2f}{tvm / ort:8.2f}{tvm / ov:8.2f}")
        if len(batches) > 1:
            lo, hi = min(batches), max(batches)
            per_image = {k: ms(per_batch[hi], k) / hi / (ms(per_batch[lo], k) / lo)
                         for k in (UINT8, TORCH_AO, PT2E, OPENVINO)}
            print(f"{'':26s}per-image time, batch {hi} over batch {lo}: TVM {per_image[UINT8]:.2f}, torch.ao "
                  f"{per_image[TORCH_AO]:.2f}, PT2E {per_image[PT2E]:.2f}, OpenVINO {per_image[OPENVINO]:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--configs", default="uniform8,uniform4,mixed")
    ap.add_argument("--batch", default="8", help="one batch size or several, comma-separated (e.g. 1,8)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="back-to-back calls per path and round (mean)")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds of sleep before each path's calls")
    ap.add_argument("--verify", action="store_true", help="count differing elements vs the integer executor")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--target", default="llvm", help="TVM target: llvm (this CPU), avx2, avx512, avx512-vnni, "
                                                     "or a target JSON; baselines capped to match")
    ap.add_argument("--baselines", default="torch,ao,pt2e,ort,openvino,hawq-onnx",
                    help="which baselines besides torch fp32 NCHW to build (comma-separated)")
    args = ap.parse_args(argv)
    cap = onednn_cap(args.target)
    if cap and os.environ.get(CAP_ENV) != cap:     # the runtimes read the cap when they load: run again, capped
        env = {**os.environ, **cap_env(cap)}
        sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__),
                                 *(sys.argv[1:] if argv is None else argv)], env=env).returncode)
    batches = [int(b) for b in str(args.batch).split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"batches": batches, "threads": os.cpu_count(), "rounds": args.rounds, "calls": args.calls,
              "target": args.target, "onednn_cap": os.environ.get(CAP_ENV), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = {}
        for batch in batches:
            rows = bench_model(name, batch, args.rounds, args.verify, args.configs.split(","), args.calls,
                               args.pause, args.target, args.baselines.split(","))
            result["models"][name][batch] = rows
            print_rows(name, batch, rows, args)
    print_summary(result["models"], batches)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
