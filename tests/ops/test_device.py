"""What the start-up shortcuts must not change on the Device (mindcpm/ops/device.py): only the fused
CPU kernels' prefill steps skip graph compilation, and only when asked (decode, every other device
and the default keep a compiled graph)."""
from __future__ import annotations

import pytest

ms = pytest.importorskip("mindspore")

from mindcpm.ops.cpu_kernels import kernels_available  # noqa: E402


def test_compiled_steps_by_device(tiny_config):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    for device in (Device(compile_prefill=False), Device("ascend", ms.float16, compile_prefill=False)):
        device.fuse_blocks(MiniCPMForCausalLM(tiny_config, device))
        assert device.compiles_step(1) and device.compiles_step(16)


@pytest.mark.skipif(not kernels_available(), reason="no g++ to build the CPU kernels")
@pytest.mark.parametrize("compile_prefill", [True, False])
def test_fused_kernels_prefill_op_by_op_only_when_asked(tiny_config, compile_prefill):
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    device = Device(kernels=True, block_size=4, cache_blocks=3, compile_prefill=compile_prefill)
    device.fuse_blocks(MiniCPMForCausalLM(tiny_config, device))
    assert device.compiles_step(1)
    assert device.compiles_step(16) == compile_prefill
