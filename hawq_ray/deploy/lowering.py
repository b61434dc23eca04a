"""The ops of the program that anchor a kernel, each with the kernel builder of the TVM back end: `KERNELS`,
keyed by op name.

Each entry is `(Group, [Value], target, name) -> Kernel`: the group `graph.plan_groups` planned around the
op (its elementwise steps, a fused max pool, a fan-out of requantizes) and the values it reads, the anchor's
inputs first. The elementwise ops are `tiles.TILES` instead (they ride at the tile of the kernel before
them, or form a standalone chain, `glue.elementwise_kernel`); that table lives apart because the kernel
builders here import the epilogue that reads it. `tests/test_op_registry.py` holds both to the registry.
"""
from __future__ import annotations

from hawq_ray.deploy.conv_pool import conv2d_max_pool_kernel
from hawq_ray.deploy.glue import (channel_gather_kernel, concat_kernel, flatten_kernel, layer_norm_kernel,
                                  pool_kernel, resize_kernel)
from hawq_ray.deploy.kernels import conv2d_kernel, dense_kernel
from hawq_ray.deploy.transformer import constant_kernel, layout_kernel, matmul_kernel, softmax_kernel


def lower_conv2d(group, ins, target, name):
    """The conv and its fused tail: with a max pool (`conv_pool.py`), or a register-tiled conv (`kernels.py`)."""
    if group.pool is not None:
        return conv2d_max_pool_kernel(group.anchor, ins[0], group.steps, group.pool, group.post, target, name,
                                      group.fanout)
    return conv2d_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name, fanout=group.fanout)


def lower_dense(group, ins, target, name):
    return dense_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name, fanout=group.fanout)


def lower_shuffle(group, ins, target, name):
    """Output channel k j + i reads input channel i C/g + j (`ops.channels`)."""
    c, g = ins[0].shape[1], group.anchor.attrs["groups"]
    return channel_gather_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name, c,
                                 lambda k: (k % g) * (c // g) + k // g)


def lower_slice(group, ins, target, name):
    a, b = group.anchor.attrs["start"], group.anchor.attrs["stop"]
    return channel_gather_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name, b - a, lambda k: k + a)


def lower_gather(group, ins, target, name):
    """Output channel k reads input channel index[k] (`ops.channels`): the index is a table of the kernel."""
    index = group.anchor.consts["index"]
    return channel_gather_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name, len(index), index)


def lower_resize(group, ins, target, name):
    return resize_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name)


def lower_concat(group, ins, target, name):
    k = len(group.anchor.inputs)
    return concat_kernel(group.anchor, ins[:k], group.steps, ins[k:], target, name)


def lower_pool(group, ins, target, name):
    return pool_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name)


def lower_flatten(group, ins, target, name):
    return flatten_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name)


def lower_layer_norm(group, ins, target, name):
    return layer_norm_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name)


def lower_layout(group, ins, target, name):
    """reshape, permute, roll, take, pad, crop: each output element read by logical index
    (`transformer.layout_kernel`), through the layout ops before it that are views (never stored:
    `graph.plan_groups`)."""
    return layout_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name, group.views)


def lower_constant(group, ins, target, name):
    """The constant repeated to the compiled batch; it reads no value (`graph.plan_groups` gives it no args)."""
    return constant_kernel(group.anchor, group.batch, group.steps, ins, target, name)


def lower_matmul(group, ins, target, name):
    return matmul_kernel(group.anchor, ins[0], ins[1], group.steps, ins[2:], target, name)


def lower_softmax(group, ins, target, name):
    return softmax_kernel(group.anchor, ins[0], group.steps, ins[1:], target, name)


KERNELS = {"conv2d": lower_conv2d, "dense": lower_dense, "channel_shuffle": lower_shuffle, "slice": lower_slice,
           "channel_gather": lower_gather, "resize": lower_resize,
           "concat": lower_concat, "sum_pool2d": lower_pool, "max_pool2d": lower_pool, "flatten": lower_flatten,
           "layer_norm": lower_layer_norm, "reshape": lower_layout, "permute": lower_layout, "take": lower_layout,
           "roll": lower_layout, "pad": lower_layout, "crop": lower_layout,
           "constant": lower_constant, "matmul": lower_matmul, "softmax": lower_softmax}

# anchors whose kernels read rank-4 inputs as NCHW[16]c blocks, and those that read plain values only
# (`graph.plan_kernels` converts an input stored the other way first); the others read either
READS_BLOCKED = ("conv2d", "sum_pool2d", "max_pool2d", "channel_shuffle", "slice", "channel_gather", "resize",
                 "concat")
READS_PLAIN = ("dense", "matmul", "softmax")
