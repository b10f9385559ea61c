"""Parameters created before their values exist."""
from __future__ import annotations

from mindspore import Parameter
from mindspore.common.initializer import initializer


def zeros_parameter(shape: tuple, dtype, name: str) -> Parameter:
    """A Parameter of zeros filled by MindSpore's initializer, without a float64 host array
    converted and copied (measured 2-3x faster; a model's KV cache is GiBs). Zeros, never
    uninitialised memory: padding rows read cache slots nothing wrote, and garbage there
    (NaN * 0 = NaN) would leak into real rows."""
    return Parameter(initializer("zeros", shape, dtype), name=name, requires_grad=False)
