"""The CPU emulation of the AscendC ops standing in for the built ops on the ascend Device.

The emulation is the shipped kernel headers compiled with g++ over the emulated primitive layer
(tests/ascendc_emu.py, kernels_aclnn/ascendc_common/emu_*.cc); emu_aot.cc wraps each op as a
MindSpore CPU "aot" custom op, so the ascend Device's graphs call the same algorithm the NPU
would run, with the op's attributes packed into one fp32 input. When traced, each call checks
the op's contract (ranks, 16-bit activations in one dtype, fp32 state, int32 indices; kernels'
op_host/*.cpp) and is counted in CALLS.

    calls = install_emulation(monkeypatch)   # patches mindcpm.ops.ascendc; skips without g++
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from tests import ascendc_emu

CALLS: Counter = Counter()
ACT, F32, I32 = "16-bit", ms.float32, ms.int32
# name -> (input name, rank, dtype) of each tensor input, in order.
CONTRACTS = {
    "LightningDecode": (("q", 3, ACT), ("k", 3, ACT), ("v", 3, ACT), ("slopes", 1, F32), ("state_pool", 4, F32),
                        ("state_slots", 1, I32), ("positions", 1, I32)),
    "LightningPrefill": (("q", 4, ACT), ("k", 4, ACT), ("v", 4, ACT), ("slopes", 1, F32), ("state_pool", 4, F32),
                         ("state_slots", 1, I32), ("positions", 2, I32)),
    "InfllmBlockSelect": (("q", 4, ACT), ("c1_cache", 3, ACT), ("c2_cache", 3, ACT), ("positions", 2, I32),
                          ("c1_table", 2, I32), ("c2_table", 2, I32)),
    "InfllmSparseAttention": (("q", 4, ACT), ("k_cache", 3, ACT), ("v_cache", 3, ACT), ("positions", 2, I32),
                              ("block_tables", 2, I32), ("selected", 4, I32)),
}


def install_emulation(monkeypatch, *macros: str) -> Counter:
    """Makes mindcpm.ops.ascendc hand out the emulated ops (built with -D<macro> for each macro:
    the mutations of tests/ascendc_emu.py); returns the (cleared) call counter."""
    import pytest
    import mindcpm.ops.ascendc as ascendc
    path = ascendc_emu.emu_library_path(*macros, part="aot")
    if path is None:
        pytest.skip("no g++ for the AscendC emulation")
    monkeypatch.setattr(ascendc, "built_ops_path", lambda: path)
    monkeypatch.setattr(ascendc, "custom_op", lambda name, attrs, shape, dtype: EmulatedOp(path, name, attrs, shape,
                                                                                          dtype))
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "0")  # a cached graph is not traced: nothing checked
    CALLS.clear()
    return CALLS


def _check_ranks(name: str, shapes) -> None:
    contract = CONTRACTS[name]
    assert len(shapes) == len(contract), f"{name} contract: {len(contract)} tensor inputs, got {len(shapes)}"
    for (arg, rank, _), shape in zip(contract, shapes):
        assert len(shape) == rank, f"{name} contract: {arg} must have rank {rank}, got shape {shape}"


def _check_dtypes(name: str, dtypes) -> None:
    dtypes = [d.element_type() if isinstance(d, ms.TensorType) else d for d in dtypes]  # Tensor[Float16] -> fp16
    for (arg, _, want), dtype in zip(CONTRACTS[name], dtypes):
        if want == ACT:
            assert dtype in (ms.float16, ms.bfloat16), f"{name} contract: {arg} must be fp16/bf16, got {dtype}"
            assert dtype == dtypes[0], f"{name} contract: {arg} is {dtype}, q is {dtypes[0]}"
        else:
            assert dtype == want, f"{name} contract: {arg} must be {want}, got {dtype}"


class EmulatedOp(nn.Cell):
    """One emulated op with its attribute values; called with the op's tensors, like the real one."""

    def __init__(self, lib: str, name: str, attrs: tuple, out_shape, out_dtype):
        super().__init__()
        n = len(CONTRACTS[name])  # the tensor inputs; the packed attributes follow

        def shape(*shapes):
            CALLS[name] += 1
            _check_ranks(name, shapes[:n])
            return out_shape(*shapes[:n])

        def dtype(*dtypes):
            _check_dtypes(name, dtypes[:n])
            return out_dtype(*dtypes[:n])

        self.op = ops.Custom(f"{lib}:{name}Aot", out_shape=shape, out_dtype=dtype, func_type="aot")
        self.attrs = Tensor(np.array(attrs, np.float32)) if attrs else None

    def construct(self, *tensors):
        if self.attrs is None:
            return self.op(*tensors)
        return self.op(*tensors, self.attrs)
