"""The Ascend MoE backend against the documented contracts of its kernels, and a MiniMax model on
the ascend backend (MoE kernels and attention kernels through their CPU stand-ins, fp16, which
they take where fp32 is refused) against the float64 NumPy reference written from the spec."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.ascend_moe_standins import install_moe_standins
from tests.ascend_standins import install_standins
from tests.reference import minimax_numpy as R
from tests.tiny_minimax import make_tiny_minimax, minimax_config

EPS16 = float(np.finfo(np.float16).eps)
MOE_OPS = ("MoeGatingTopKSoftmax", "MoeInitRouting", "MoeComputeExpertTokens", "GroupedMatmul", "MoeFinalizeRouting")


@pytest.mark.parametrize("n", [1, 13])
def test_ascend_moe_matches_dense_loop(monkeypatch, n):
    import mindspore as ms
    from mindcpm.layers.moe import MoE
    from mindcpm.ops import Device
    calls = install_moe_standins(monkeypatch)
    calls.clear()
    rng = np.random.default_rng(n)
    hidden, inter, e, k = 16, 8, 4, 2
    x = rng.standard_normal((n, hidden))
    p = "model.layers.0.block_sparse_moe."
    w = {p + "gate.weight": rng.standard_normal((e, hidden))}
    for i in range(e):
        for name, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            w[f"{p}experts.{i}.{name}.weight"] = rng.standard_normal(shape) * 0.3
    ref = R.moe(type("C", (), dict(top_k=k, shared=0)), w, "model.layers.0.", x)
    device = Device("ascend", dtype=ms.float16)
    cell = MoE(hidden, inter, e, k, device.moe(), ms.float16, device)
    cell.gate.weight.set_data(ms.Tensor(w[p + "gate.weight"], ms.float32))
    # As the loader fills them ([E, out, in]); the device then lays them out for GroupedMatmul.
    cell.experts.w13.weight.set_data(ms.Tensor(np.stack(
        [np.concatenate([w[f"{p}experts.{i}.w1.weight"], w[f"{p}experts.{i}.w3.weight"]]) for i in range(e)]),
        ms.float16))
    cell.experts.w2.weight.set_data(ms.Tensor(np.stack([w[f"{p}experts.{i}.w2.weight"] for i in range(e)]),
                                              ms.float16))
    device.after_load(cell)
    assert cell.experts.w13.weight.shape == (e, hidden, 2 * inter)
    got = cell(ms.Tensor(x[None], ms.float16)).asnumpy()[0].astype(np.float64)
    # fp16 input, weights and output against float64: measured here 0.8 eps x max(1, |out|).
    np.testing.assert_allclose(got, ref, rtol=0, atol=4 * EPS16 * max(1.0, np.abs(ref).max()))
    assert all(calls[op] >= 1 for op in MOE_OPS), dict(calls)


def test_minimax_engine_on_ascend_backend_matches_reference(monkeypatch, tmp_path):
    from mindcpm import LLM, SamplingParams
    calls = install_standins(monkeypatch)
    install_moe_standins(monkeypatch)
    cfg = minimax_config(hidden=64, heads=2, head_dim=32, kv_heads=1, attn_types=(0, 1, 0), intermediate=32)
    path = make_tiny_minimax(str(tmp_path / "m"), cfg, seed=2)
    llm = LLM(model=path, attention="ascend", dtype="float16", kernels="off", max_model_len=64, block_size=16,
              max_num_seqs=2, progress=False)
    prompts = [[256, 10, 20, 30, 40, 50, 60], [256] + list(range(70, 81))]
    out = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    with open(os.path.join(path, "config.json")) as f:
        rcfg = R.Config(json.load(f))
    weights = R.load(os.path.join(path, "model.safetensors"))
    assert [o.outputs[0].token_ids for o in out] == [R.greedy(rcfg, weights, p, 6) for p in prompts]
    assert all(calls[op] >= 1 for op in MOE_OPS + ("ReshapeAndCache", "PagedAttention", "FlashAttentionScore")), \
        dict(calls)
