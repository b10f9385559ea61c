"""Parameters created without host arrays (mindcpm/layers/params.py) hold zeros: cache slots
nothing wrote are read by padding rows, and garbage there leaks into real rows as NaN * 0 = NaN."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")


def _values(param) -> np.ndarray:
    return param.astype(ms.float32).asnumpy()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_zeros_parameter_is_zero_everywhere(dtype):
    from mindcpm.layers.params import zeros_parameter
    param = zeros_parameter((7, 3, 5), getattr(ms, dtype), "k_cache")
    assert param.dtype == getattr(ms, dtype) and param.name == "k_cache" and not param.requires_grad
    np.testing.assert_array_equal(_values(param), np.zeros((7, 3, 5), np.float32))


def test_model_caches_are_zero_where_padding_reads(tiny_config):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    device = Device(block_size=4, cache_blocks=3)
    model = MiniCPMForCausalLM(tiny_config, device)
    caches = [p for p in model.get_parameters() if p.name.endswith(("k_cache", "v_cache"))]
    assert len(caches) == 2 * tiny_config.num_layers
    for cache in caches:
        assert cache.shape == device.cache_shape(tiny_config.num_kv_heads, tiny_config.head_dim)
        assert not np.any(_values(cache)), cache.name
