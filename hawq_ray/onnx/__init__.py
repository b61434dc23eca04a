"""ONNX export: an IntegerProgram as an ONNX model in QDQ form, checked in onnxruntime.

    from hawq_ray.onnx.export import export_onnx, check_onnx

`qdq.py` holds the graph under construction and its two forms, `converters.py` each op's nodes (keyed by op
name, as the TVM back end's tables are), `export.py` the export and its checks. The package imports no TVM.
"""
