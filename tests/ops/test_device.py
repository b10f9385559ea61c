"""What start-up shortcuts must not change: parameters created without host arrays hold zeros
(cache slots nothing wrote are read by padding rows, and garbage there leaks into real rows as
NaN * 0 = NaN), and only the fused CPU kernels' prefill steps skip graph compilation, and only
when asked (decode, every other device and the default keep a compiled graph)."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindcpm.ops.cpu_kernels import kernels_available  # noqa: E402
from tests.tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    from mindcpm.config import ModelConfig
    return ModelConfig.from_dir(make_tiny_model(str(tmp_path_factory.mktemp("tiny_startup"))))


def _values(param) -> np.ndarray:
    return param.astype(ms.float32).asnumpy()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_zeros_parameter_is_zero_everywhere(dtype):
    from mindcpm.layers.params import zeros_parameter
    param = zeros_parameter((7, 3, 5), getattr(ms, dtype), "k_cache")
    assert param.dtype == getattr(ms, dtype) and param.name == "k_cache" and not param.requires_grad
    np.testing.assert_array_equal(_values(param), np.zeros((7, 3, 5), np.float32))


def test_model_caches_are_zero_where_padding_reads(tiny_cfg):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    device = Device(block_size=4, cache_blocks=3)
    model = MiniCPMForCausalLM(tiny_cfg, device)
    caches = [p for p in model.get_parameters() if p.name.endswith(("k_cache", "v_cache"))]
    assert len(caches) == 2 * tiny_cfg.num_layers
    for cache in caches:
        assert cache.shape == device.cache_shape(tiny_cfg.num_kv_heads, tiny_cfg.head_dim)
        assert not np.any(_values(cache)), cache.name


def test_compiled_steps_by_device(tiny_cfg):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    for device in (Device(compile_prefill=False), Device("ascend", ms.float16, compile_prefill=False)):
        device.fuse_blocks(MiniCPMForCausalLM(tiny_cfg, device))
        assert device.compiles_step(1) and device.compiles_step(16)


@pytest.mark.skipif(not kernels_available(), reason="no g++ to build the CPU kernels")
@pytest.mark.parametrize("compile_prefill", [True, False])
def test_fused_kernels_prefill_op_by_op_only_when_asked(tiny_cfg, compile_prefill):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    device = Device(kernels=True, block_size=4, cache_blocks=3, compile_prefill=compile_prefill)
    device.fuse_blocks(MiniCPMForCausalLM(tiny_cfg, device))
    assert device.compiles_step(1)
    assert device.compiles_step(16) == compile_prefill
