"""What the start-up shortcuts must not change on the Device (mindcpm/ops/device.py): only the fused
CPU kernels' steps start op by op, and only when asked (every other device and the default compile
at once; prefill then never compiles, decode after EAGER_DECODE_STEPS steps)."""
from __future__ import annotations

import pytest

ms = pytest.importorskip("mindspore")

from mindcpm.ops.cpu_kernels import kernels_available  # noqa: E402


def test_compiled_steps_by_device(tiny_config):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    for device in (Device(compile_prefill=False), Device("ascend", ms.float16, compile_prefill=False)):
        device.fuse_blocks(MiniCPMForCausalLM(tiny_config, device))
        assert device.eager_steps(decode_row=True) == 0 and device.eager_steps(decode_row=False) == 0


@pytest.mark.skipif(not kernels_available(), reason="no g++ to build the CPU kernels")
@pytest.mark.parametrize("compile_prefill", [True, False])
def test_fused_kernels_prefill_op_by_op_only_when_asked(tiny_config, compile_prefill):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    device = Device(kernels=True, block_size=4, cache_blocks=3, compile_prefill=compile_prefill)
    device.fuse_blocks(MiniCPMForCausalLM(tiny_config, device))
    from mindcpm.ops.device import EAGER_DECODE_STEPS
    assert device.eager_steps(decode_row=True) == (0 if compile_prefill else EAGER_DECODE_STEPS)
    assert device.eager_steps(decode_row=False) == (0 if compile_prefill else float("inf"))


@pytest.mark.skipif(not kernels_available(), reason="no g++ to build the CPU kernels")
def test_fused_quantized_layer_returns_early_only_before_the_next_fused_layer(tiny_config):
    """A fused quantized layer returns before its work is done only when the next fused layer,
    which waits for it, alone reads its output; not the last layer, whose output MindSpore's own
    ops read, nor a layer whose output a draft head's aux_hidden_layers keep."""
    import dataclasses
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    cfg = dataclasses.replace(tiny_config, num_layers=4)
    for aux, expected in (((), [True, True, True, False]), ((2,), [True, False, True, False])):
        device = Device(kernels=True, block_size=4, cache_blocks=3, quantization="int8")
        model = MiniCPMForCausalLM(cfg, device, aux_hidden_layers=aux)
        device.fuse_blocks(model)
        assert [layer.returns_early for layer in model.layers] == expected
