"""The engine on the ascend Device with the AscendC ops' CPU emulation standing in for the built
ops (tests/ascendc_standins.py: the shipped kernel headers compiled with g++), in fp16, against
the native composites in fp32: a sparse MiniCPM4 with prompts past dense_len (InfllmBlockSelect,
InfllmSparseAttention) and a tiny MiniMax (LightningPrefill, LightningDecode; its softmax
attention and MoE on the stand-ins of tests/ascend_standins.py and ascend_moe_standins.py).
Both sides run the same schedule: chunked prefill, a block pool so small that a sequence is
preempted and recomputed, and a request aborted after its first token (its blocks and state
slot are reused).

Tolerance: the 16-bit side rounds every activation and the caches to fp16 (2^-11 relative a
rounding); over the tiny models' few layers that is a few dozen roundings of O(1) logits, so
logprobs agree within 32 fp16 ulps at 1.0 (scripts/validate_ascend.py's end-to-end bound).
Measured: < 2e-3."""
from __future__ import annotations

import numpy as np
import pytest

from tests.ascend_moe_standins import install_moe_standins
from tests.ascend_standins import install_standins
from tests.ascendc_standins import install_emulation
from tests.models.test_minicpm_sparse import SPARSE, make_sparse_model
from tests.tiny_minimax import make_tiny_minimax, minimax_config

LOGPROB_TOL = 32 * 2.0 ** -10
MAX_TOKENS = 8

# name -> (prompts, LLM settings). Sparse: the prompts pass dense_len 200, chunks of 128 tokens,
# the pool (max_model_len / 16 = 32 blocks) holds both prompts (19 + 13 blocks) but not the first
# one's 20th block. MiniMax: chunks of 16 continue the lightning state; 4 blocks hold the prompts
# (2 + 2) but not the second one's third.
CASES = {
    "sparse-minicpm4": ([[256] + [(7 * i + 3 * j) % 250 for i in range(n)] for j, n in enumerate([300, 200])],
                        dict(max_model_len=512, max_num_batched_tokens=128)),
    "minimax": ([[256] + [(5 * i + 11 * j) % 250 for i in range(n)] for j, n in enumerate([21, 29])],
                dict(max_model_len=64, max_num_batched_tokens=16)),
}
CUSTOM_OPS = {"sparse-minicpm4": ("InfllmBlockSelect", "InfllmSparseAttention"),
              "minimax": ("LightningPrefill", "LightningDecode")}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ascendc_engine")
    cfg = minimax_config(hidden=64, heads=2, head_dim=32, kv_heads=1, attn_types=(0, 1, 0), intermediate=32)
    return {"sparse-minicpm4": make_sparse_model(str(root / "sparse"), dict(SPARSE, dense_len=200)),
            "minimax": make_tiny_minimax(str(root / "minimax"), cfg, seed=2)}


def _run(path, name, monkeypatch, **kw):
    """Aborts one request after its first token, then generates every prompt greedily with
    logprobs under the case's schedule; returns [(tokens, logprobs of them)] and the preemptions."""
    from mindcpm import LLM, SamplingParams
    prompts, settings = CASES[name]
    llm = LLM(model=path, kernels="off", max_num_seqs=2, kv_cache_gib=1e-9, progress=False, **settings, **kw)
    scheduler = llm.engine.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    stream = llm.stream({"prompt_token_ids": prompts[1]}, params)
    next(stream)
    stream.close()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    preempted = []
    original = scheduler._preempt
    monkeypatch.setattr(scheduler, "_preempt", lambda seq: (preempted.append(seq.seq_id), original(seq)))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert not llm.engine.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs], preempted


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_ascendc_ops_match_native_fp32(model_dirs, name, monkeypatch):
    from mindcpm.ops import setup_runtime
    setup_runtime("cpu")
    path = model_dirs[name]
    want, preempted = _run(path, name, monkeypatch, dtype="float32", attention="native")
    assert preempted  # the schedule really preempts
    calls = install_emulation(monkeypatch)
    if name == "minimax":
        install_standins(monkeypatch)
        install_moe_standins(monkeypatch)
    got, preempted = _run(path, name, monkeypatch, dtype="float16", attention="ascend")
    assert preempted
    assert all(calls[op] for op in CUSTOM_OPS[name]), dict(calls)  # the emulated kernels served the model
    for (want_ids, want_lp), (got_ids, got_lp) in zip(want, got):
        assert got_ids == want_ids
        np.testing.assert_allclose(got_lp, want_lp, atol=LOGPROB_TOL, rtol=0)


def test_without_built_ops_the_composites_run_with_one_line(monkeypatch, capsys):
    import mindspore as ms
    import mindcpm.ops.ascendc as ascendc
    from mindcpm.ops import Device
    from mindcpm.ops.lightning import NativeLightning
    monkeypatch.delenv("ASCEND_CUSTOM_OPP_PATH", raising=False)
    monkeypatch.delenv("ASCEND_OPP_PATH", raising=False)
    monkeypatch.setattr(ascendc, "_warned", False)
    device = Device("ascend", dtype=ms.float16)
    assert isinstance(device.lightning(), NativeLightning) and isinstance(device.lightning(), NativeLightning)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ascendc.BUILD_COMMAND in lines[0], lines


# -- scripts/validate_ascend.py's op checks (scripts/ascendc_op_checks.py) on the emulation ------------
@pytest.mark.parametrize("op", ["LightningDecode", "LightningPrefill", "InfllmBlockSelect", "InfllmSparseAttention"])
def test_validate_op_checks_pass_on_the_emulation(monkeypatch, op):
    from scripts.ascendc_op_checks import CHECKS
    install_emulation(monkeypatch)
    ok, detail = CHECKS[op]("float16")
    assert ok, detail


@pytest.mark.parametrize("op, mutation", [("LightningPrefill", "MUTATE_DECAY_EXPONENT"),
                                          ("InfllmSparseAttention", "MUTATE_PAGE_INDEX"),
                                          ("InfllmSparseAttention", "MUTATE_MISSING_RESCALE")])
def test_validate_op_checks_catch_a_mutated_kernel(monkeypatch, op, mutation):
    from scripts.ascendc_op_checks import CHECKS
    install_emulation(monkeypatch, mutation)
    ok, detail = CHECKS[op]("float16")
    assert not ok, detail
