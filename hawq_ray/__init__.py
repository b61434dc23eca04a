"""hawq-ray: HAWQ-V3 mixed-precision bit allocation, fine-tuning and integer-only TVM deployment on Ray.

`hawq_ray.run(...)` runs the whole job (hawq_ray.service.pipeline); each stage is a function from tables to
tables in its own module: quant.layers.layer_table, analysis.sensitivity.layer_traces,
service.profile.profile_layers, solver.ilp.solve_bits, quant.finetune.finetune, deploy.build.compile_program,
service.report.write_report. `hawq_ray.time_models({name: load_model(dir)})` times compiled models together
(interleaved rounds: median and interquartile range), `hawq_ray.against_budget` sets them beside the predicted
latency and budget. docs/design.md maps the packages.
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import hawq_ray` light: torch, ray and tvm load on first use
    if name in ("run", "load_config"):
        from hawq_ray.service import pipeline
        return getattr(pipeline, name)
    if name in ("time_models", "against_budget"):
        from hawq_ray.analysis import timing
        return getattr(timing, name)
    raise AttributeError(f"module 'hawq_ray' has no attribute {name!r}")
