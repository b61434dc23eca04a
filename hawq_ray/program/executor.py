"""The PyTorch integer executor: runs an IntegerProgram with integer tensors only (the reference).

Each op's semantics is its registry entry's `execute` (`hawq_ray.ops`): convolutions are im2col + exact
integer matrix products (a float GEMM only where a bound proves it exact, else int64); pooling,
requantization, add and concat are integer ops. Every op's inputs and output are checked to be integer
tensors: a float tensor anywhere is an error.
"""
from __future__ import annotations

import torch

from hawq_ray.ops import check_ops, program_op
from hawq_ray.program.program import IntegerProgram, Op


class FloatTensorError(TypeError):
    pass


def _int(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise FloatTensorError(f"integer executor: {where} is a {t.dtype} tensor")
    return t


def run_op(op: Op, ins: list[torch.Tensor]) -> torch.Tensor:
    return program_op(op.op).execute(op, ins)


def run_program(program: IntegerProgram, q_input: torch.Tensor, record: bool = False):
    """Run `program` on an int8 input batch; returns the INT32 output (and every value if `record`)."""
    check_ops(program.ops)
    values = {program.input_name: _int(q_input, "the program input")}
    with torch.no_grad():
        for op in program.ops:
            ins = [_int(values[i], f"input {i!r} of {op.op} {op.output!r}") for i in op.inputs]
            values[op.output] = _int(run_op(op, ins), f"output of {op.op} {op.output!r}")
    out = values[program.output]
    return (out, values) if record else out
