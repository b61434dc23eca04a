"""Every op, one module per op family, each registered in `registry` on import (see its docstring)."""
from hawq_ray.ops.registry import (GRAPH_NODES, HANDLED, PROGRAM_OPS, GraphNode, ProgramOp, check_ops,  # noqa: F401
                                   elementwise, program_op, register_ops, unregister_ops)
# they register on import; layout last: its converters take the reshapes, transposes and indexing the others decline
from hawq_ray.ops import (batchnorm, channels, clamp, conv, flatten, join, layernorm, lookup, mul,  # noqa: F401,E402
                          pool, relu, requantize, resize, matmul, softmax, window, layout)
