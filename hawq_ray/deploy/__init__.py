"""TVM back end: IntegerProgram -> integer-only compiled module (one kernel per layer), export, load.

    from hawq_ray.deploy import load_model
    model = load_model("out/")          # model.so + params.npz + manifest.json
    logits_int32 = model(x_int8)        # x: (N, C, H, W) int8 numpy array

The CPU runtime uses TVM_NUM_THREADS threads; a model sets it to the target's cores if it is unset when the
model first runs (set it yourself before anything else runs TVM code to choose).
"""
from hawq_ray.deploy.build import compile_program, export_model, load_model, read_manifest  # noqa: F401
from hawq_ray.deploy.target import parse_target  # noqa: F401
from hawq_ray.deploy.layer import build_layer_kernel, compile_kernel, time_kernel  # noqa: F401
