"""hawq-ray: HAWQ-V3 mixed-precision bit allocation, fine-tuning and integer-only TVM deployment on Ray.

`hawq_ray.run(...)` runs the whole job (see hawq_ray.pipeline); each stage is a function of its own module:
layers.layer_table, quant.qat.prepare, sensitivity.layer_traces, solver.ilp.solve_bits, finetune.finetune,
deploy.build.compile_program, report.write_report.
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import hawq_ray` light: torch, ray and tvm load on first use
    if name in ("run", "load_config"):
        from hawq_ray import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'hawq_ray' has no attribute {name!r}")
