"""TVM back end: IntegerProgram -> integer-only compiled module (one kernel per layer), export, load.

    from hawq_ray.deploy import load_model
    model = load_model("out/")          # model.so + params.npz + manifest.json
    logits_int32 = model(x_int8)        # x: (N, C, H, W) int8 numpy array

The CPU runtime uses TVM_NUM_THREADS threads; a model sets it to the target's cores if it is unset when the
model first runs (set it yourself before anything else runs TVM code to choose).
"""
import importlib

_EXPORTS = {"compile_program": "build", "export_model": "build", "load_model": "build", "read_manifest": "build",
            "parse_target": "target", "build_layer_kernel": "layer", "compile_kernel": "layer", "time_kernel": "layer"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    """Import TVM only when a TVM function is used, so the CLI starts fast."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hawq_ray.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hawq_ray.deploy.{_EXPORTS[name]}"), name)
