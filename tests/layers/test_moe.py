"""The MoE block (mindcpm/layers/moe.py over ops/moe.py) against a dense loop over the experts in
float64 NumPy (tests/reference/minimax_numpy.py), and the fp32 router of 16-bit weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.reference import minimax_numpy as R


@pytest.mark.parametrize("n", [1, 2, 13])  # n * top_k <= experts takes the gather path, more the dense one
def test_moe_matches_dense_loop(n):
    import mindspore as ms
    from mindcpm.layers.moe import MoE
    from mindcpm.ops.moe import NativeMoE
    rng = np.random.default_rng(n)
    hidden, inter, e, k = 16, 8, 4, 2
    x = rng.standard_normal((n, hidden))
    w = {"model.layers.0.block_sparse_moe.gate.weight": rng.standard_normal((e, hidden))}
    for i in range(e):
        for name, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            w[f"model.layers.0.block_sparse_moe.experts.{i}.{name}.weight"] = rng.standard_normal(shape) * 0.3
    cfg = type("C", (), dict(top_k=k, shared=0))
    ref = R.moe(cfg, w, "model.layers.0.", x)
    cell = MoE(hidden, inter, e, k, NativeMoE())
    cell.gate.weight.set_data(ms.Tensor(w["model.layers.0.block_sparse_moe.gate.weight"], ms.float32))
    p = "model.layers.0.block_sparse_moe.experts."
    w13 = np.stack([np.concatenate([w[f"{p}{i}.w1.weight"], w[f"{p}{i}.w3.weight"]]) for i in range(e)])
    cell.experts.w13.weight.set_data(ms.Tensor(w13, ms.float32))
    cell.experts.w2.weight.set_data(ms.Tensor(np.stack([w[f"{p}{i}.w2.weight"] for i in range(e)]), ms.float32))
    got = cell(ms.Tensor(x[None], ms.float32)).asnumpy()[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_router_stays_fp32_with_16_bit_weights_on_cpu(tmp_path):
    """LLM(dtype="bfloat16") on CPU stores the matrices in bf16, but not the router (docs/minimax.md#precision-rules)."""
    import mindspore as ms
    from mindcpm.config import ModelConfig
    from mindcpm.models.minimax import MiniMaxForCausalLM
    from mindcpm.ops import Device
    from mindcpm.ops.cpu_kernels import kernels_available
    from tests.tiny_minimax import minimax_config
    if not kernels_available():
        pytest.skip("16-bit weights on CPU need the CPU kernels (no g++)")
    cfg = minimax_config(hidden=32, heads=2, head_dim=16, kv_heads=1, attn_types=(0, 1), intermediate=8,
                         shared_intermediate=8)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    device = Device(weight_dtype=ms.bfloat16, kernels=True, block_size=8, cache_blocks=3)
    m = MiniMaxForCausalLM(ModelConfig.from_dir(str(tmp_path)), device, 2)
    layer = m.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == ms.bfloat16
    assert layer.block_sparse_moe.gate.weight.dtype == ms.float32 and layer.coefficient.weight.dtype == ms.float32
