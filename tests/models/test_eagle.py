"""EAGLE draft head (models/eagle.py, engine/drafter.py): its logits equal a float64 numpy
reference written from the head's math (vLLM's minicpm_eagle.py layout); in the engine,
greedy outputs equal the non-speculative engine's token for token."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.engine_probe import all_free, run_with_random_aborts, tokens
from tests.tiny import VOCAB, make_tiny_model, tiny_llm

HIDDEN, HEADS, KV_HEADS, FFN, EPS = 64, 4, 2, 96, 1e-5
HEAD_DIM = HIDDEN // HEADS
DRAFT_VOCAB = 40  # the reduced (FR-Spec) head's rows


def _draft_tensors(rng, own_vocab: bool, num_layers: int) -> dict[str, np.ndarray]:
    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"model.fc.weight": w(HIDDEN, 2 * HIDDEN), "model.norm.weight": w(HIDDEN),
         "model.input_norm1.weight": 1 + w(HIDDEN), "model.input_norm2.weight": 1 + w(HIDDEN)}
    for i in range(num_layers):
        t.update(_layer_tensors(w, f"model.eagle_layers.{i}.", HIDDEN))
    if own_vocab:
        t["model.embed_tokens.weight"] = w(VOCAB, HIDDEN)
        t.update(_reduced_head(rng, w))
    return t


def _layer_tensors(w, p, in_features):
    return {p + "input_layernorm.weight": 1 + w(HIDDEN), p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, in_features),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, in_features),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, in_features),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN), p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN)}


def _reduced_head(rng, w):
    """A reduced head whose draft id i is target id i + d2t[i]: a non-identity map (every third
    target id, shuffled)."""
    targets = rng.permutation(np.arange(0, 3 * DRAFT_VOCAB, 3))
    return {"lm_head.weight": w(DRAFT_VOCAB, HIDDEN), "d2t": (targets - np.arange(DRAFT_VOCAB)).astype(np.int64),
            "t2d": np.zeros(VOCAB, bool)}


AUX_LAYERS = [1, 0, 1]  # target layers whose input hidden states an EAGLE-3 head reads, in this order


def make_eagle3_draft(path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """An EAGLE-3 head in vLLM's llama_eagle3 layout, sharing the target's embedding."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"fc.weight": w(HIDDEN, 3 * HIDDEN, scale=0.1), "norm.weight": 1 + w(HIDDEN),
         "midlayer.hidden_norm.weight": 1 + w(HIDDEN), **_layer_tensors(w, "midlayer.", 2 * HIDDEN),
         **_reduced_head(rng, w)}
    save_file(t, os.path.join(path, "model.safetensors"))
    config = dict(architectures=["LlamaForCausalLMEagle3"], vocab_size=VOCAB, hidden_size=HIDDEN,
                  intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  rms_norm_eps=EPS, max_position_embeddings=512, draft_vocab_size=DRAFT_VOCAB,
                  eagle_aux_hidden_state_layer_ids=AUX_LAYERS, tie_word_embeddings=False)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return t


def reference_eagle3(t, embed, ids, hidden):
    """vLLM's llama_eagle3 step, per position: (logits of the reduced head, the next hidden state).
    hidden: per position, the target's aux hidden states [3H] or the head's own [H]."""
    t = {k: v.astype(np.float64) for k, v in t.items() if v.dtype != bool}
    # Rows of the target's aux hidden states are reduced by fc; the head's own are read as they are.
    h = np.stack([np.asarray(r, np.float64) if len(r) == HIDDEN else t["fc.weight"] @ r for r in hidden])
    x = np.concatenate([_rms(embed[ids].astype(np.float64), t["midlayer.input_layernorm.weight"]),
                        _rms(h, t["midlayer.hidden_norm.weight"])], -1)
    h = h + _attention(t, "midlayer.", x)
    h = h + _mlp(t, "midlayer.", _rms(h, t["midlayer.post_attention_layernorm.weight"]))
    return _rms(h, t["norm.weight"]) @ t["lm_head.weight"].T, h


def make_draft(path: str, own_vocab: bool, num_layers: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    tensors = _draft_tensors(np.random.default_rng(seed), own_vocab, num_layers)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config = dict(architectures=["EagleMiniCPMForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
                  intermediate_size=FFN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, rms_norm_eps=EPS, max_position_embeddings=512,
                  # Shared with a Llama target, the embedding is unscaled.
                  scale_emb=12.0 if own_vocab else 1.0, scale_depth=1.4, dim_model_base=16, mup_denominator=3,
                  tie_word_embeddings=False)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return tensors


# -- the numpy reference, float64, straight from the math ------------------------------------
def _rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * w


def _rope(x, positions):
    inv = 1.0 / 10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angle = positions[:, None, None] * np.concatenate([inv, inv])  # [L, 1, D]
    x1, x2 = x[..., :HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
    return x * np.cos(angle) + np.concatenate([-x2, x1], -1) * np.sin(angle)


def reference_head(t, embed, head, ids, target_hidden, num_layers, scale_emb):
    """Per position: (logits over the head's rows, the scaled hidden state)."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    e = _rms(embed[ids].astype(np.float64) * scale_emb, t["model.input_norm1.weight"])
    h = _rms(target_hidden.astype(np.float64), t["model.input_norm2.weight"])
    z = np.concatenate([e, h], -1) @ t["model.fc.weight"].T
    s = 1.4 / np.sqrt(3)  # scale_depth / sqrt(mup_denominator)
    for i in range(num_layers):
        p = f"model.eagle_layers.{i}."
        z = z + s * _attention(t, p, _rms(z, t[p + "input_layernorm.weight"]))
        z = z + s * _mlp(t, p, _rms(z, t[p + "post_attention_layernorm.weight"]))
    out = z / (HIDDEN / 16)  # no final norm; / scale_width
    return out @ head.astype(np.float64).T, out


def _attention(t, p, x):
    """Causal GQA self-attention with RoPE at positions 0..L-1, then o_proj."""
    length = len(x)
    pos = np.arange(length, dtype=np.float64)
    q = _rope((x @ t[p + "self_attn.q_proj.weight"].T).reshape(length, HEADS, HEAD_DIM), pos)
    k = _rope((x @ t[p + "self_attn.k_proj.weight"].T).reshape(length, KV_HEADS, HEAD_DIM), pos)
    v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(length, KV_HEADS, HEAD_DIM)
    k, v = (np.repeat(a, HEADS // KV_HEADS, axis=1) for a in (k, v))
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(HEAD_DIM)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(length, HIDDEN) @ t[p + "self_attn.o_proj.weight"].T


def _mlp(t, p, x):
    gate, up = x @ t[p + "mlp.gate_proj.weight"].T, x @ t[p + "mlp.up_proj.weight"].T
    return (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_eagle")))


def _eagle(draft_dir, k=3, method="eagle"):
    return {"method": method, "model": draft_dir, "num_speculative_tokens": k}


@pytest.mark.parametrize("own_vocab", [False, True], ids=["shared-head", "frspec-d2t"])
def test_draft_logits_match_numpy_reference(tiny_dir, tmp_path, own_vocab):
    """Two sequences of different lengths through the head's paged step at once: each one's last
    logits and hidden state equal the reference's at that position; the draft id is the target
    id of the arg-max through d2t."""
    from mindspore import Tensor
    from safetensors.numpy import load_file

    from mindcpm import SamplingParams
    from mindcpm.engine.sequence import Sequence
    layers = 2
    tensors = make_draft(str(tmp_path / "draft"), own_vocab, num_layers=layers)
    llm = tiny_llm(tiny_dir, speculative_config=_eagle(str(tmp_path / "draft")))
    drafter, blocks = llm.engine.proposer, llm.engine.scheduler.block_manager
    target = load_file(os.path.join(tiny_dir, "model.safetensors"))
    embed = tensors.get("model.embed_tokens.weight", target["model.embed_tokens.weight"])
    head = tensors.get("lm_head.weight", target["lm_head.weight"])
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (11, 5)]
    hidden = [rng.standard_normal((len(p), HIDDEN)).astype(np.float32) for p in prompts]
    seqs = [Sequence(p, SamplingParams(), blocks.block_size) for p in prompts]
    for s in seqs:
        blocks.allocate(s)

    def hidden_for(rows, w):
        x = np.zeros((rows, w, HIDDEN), np.float32)
        for i, h in enumerate(hidden):
            x[i, :len(h)] = h
        return Tensor(x)

    logits, ids, out = drafter._step([(p, 0, s.block_table) for p, s in zip(prompts, seqs)], hidden_for)
    assert logits.shape[1] == (DRAFT_VOCAB if own_vocab else VOCAB)
    for i, p in enumerate(prompts):
        ref_logits, ref_out = reference_head(tensors, embed, head, np.asarray(p), hidden[i], layers,
                                             12.0 if own_vocab else 1.0)
        np.testing.assert_allclose(logits.asnumpy()[i], ref_logits[-1], rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(out.asnumpy()[i], ref_out[-1], rtol=2e-4, atol=2e-5)
        best = int(np.argmax(ref_logits[-1]))
        want = best + int(tensors["d2t"][best]) if own_vocab else best
        assert ids[i] == want
    for s in seqs:
        blocks.deallocate(s)


# -- in the engine ----------------------------------------------------------------------------
PROMPTS = [[256] + list(range(3 + i, 3 + i + n)) * 2 for i, n in enumerate([3, 17, 9, 30, 1, 5])]


def _greedy(max_tokens=16, **kw):
    from mindcpm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eagle_draft"))
    make_draft(path, own_vocab=True)
    return path


@pytest.fixture(scope="module")
def reference(tiny_dir):
    llm = tiny_llm(tiny_dir, max_model_len=128, max_num_seqs=8)
    return tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy()))


# Chunked prefill and a pool of 16 blocks of 8 tokens, which forces preemption.
@pytest.mark.parametrize("kw", [dict(max_num_seqs=8), dict(max_num_seqs=6, max_num_batched_tokens=16, kv_cache_gib=1e-9)],
                         ids=["batched", "chunked-tiny-pool"])
def test_eagle_greedy_equals_non_speculative(tiny_dir, draft_dir, reference, kw):
    llm = tiny_llm(tiny_dir, max_model_len=128, speculative_config=_eagle(draft_dir), **kw)
    scheduler, preempted = llm.engine.scheduler, []
    original = scheduler._preempt
    scheduler._preempt = lambda seq: (preempted.append(seq.seq_id), original(seq))
    assert tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy())) == reference
    assert llm.engine.spec_stats.num_draft_tokens > 0
    assert all_free(llm)
    assert bool(preempted) == ("kv_cache_gib" in kw)


def test_eagle_random_aborts_free_every_block(tiny_dir, draft_dir, reference):
    llm = tiny_llm(tiny_dir, max_model_len=128, max_num_seqs=8, speculative_config=_eagle(draft_dir))
    engine = llm.engine
    states = run_with_random_aborts(engine, PROMPTS, _greedy(), 0.1)
    kept = [s for s in states if s.seq.finish_reason == "length"]
    assert kept and [s.seq.completion_token_ids for s in kept] == [reference[states.index(s)] for s in kept]
    assert all_free(llm)


def test_eagle_steady_state_compiles_nothing_new(tiny_dir, draft_dir):
    """The head's steps compile per shape bucket like the target's: the same workload again (no
    prefix cache, so the same steps) compiles nothing, in the target or the head."""
    llm = tiny_llm(tiny_dir, max_model_len=128, max_num_seqs=8, enable_prefix_caching=False,
                   speculative_config=_eagle(draft_dir))
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    llm.generate(prompts, _greedy())
    target, head = set(llm.engine.runner.compiled_shapes), set(llm.engine.proposer.steps)
    llm.generate(prompts, _greedy())
    assert (set(llm.engine.runner.compiled_shapes), set(llm.engine.proposer.steps)) == (target, head)
    assert any(key[0][1] == 1 for key in head)  # chain steps: input_ids [rows, 1]


def test_engine_drafts_equal_the_reference_chain(tiny_dir, draft_dir):
    """The chains the engine drafts after prefill, verify steps with rejections and rollbacks equal
    the head run from scratch in numpy over the whole sequence (the target's hidden states at
    its positions, then the head's own for each draft): its paged cache holds the right K/V."""
    from safetensors.numpy import load_file
    llm = tiny_llm(tiny_dir, max_model_len=128, max_num_seqs=4, speculative_config=_eagle(draft_dir))
    captured = _capture_chains(llm)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], _greedy(max_tokens=12))
    assert len(captured) > 6
    t = load_file(os.path.join(draft_dir, "model.safetensors"))

    def head(ids, hidden):
        return reference_head(t, t["model.embed_tokens.weight"], t["lm_head.weight"], ids, np.stack(hidden), 1, 12.0)

    for token_ids, drafts in captured[::3]:
        assert drafts == _reference_chain(head, token_ids, _target_hidden(llm, token_ids[:-1]), len(drafts), t["d2t"])


def _capture_chains(llm) -> list:
    """(token ids, drafts) of every chain the engine drafts from now on."""
    drafter, captured = llm.engine.proposer, []
    extend = drafter.extend

    def capture(batch):
        extend(batch)
        captured.extend((list(s.token_ids), list(s.spec_token_ids)) for s in batch.seqs if s.spec_token_ids)

    drafter.extend = capture
    return captured


def _reference_chain(head, token_ids, target_hidden, k, d2t) -> list[int]:
    """k greedy drafts of head(ids, hidden) -> (logits, hidden out) per position: position p reads
    token p + 1 and the target's hidden state at p, then each draft the head's own."""
    ids, hidden = list(token_ids[1:]), [h for h in target_hidden]
    drafts = []
    for _ in range(k):
        logits, out = head(np.asarray(ids), hidden)
        best = int(np.argmax(logits[-1]))
        drafts.append(best + int(d2t[best]))
        ids.append(drafts[-1])
        hidden.append(out[-1])
    return drafts


def _target_hidden(llm, token_ids):
    """The target's final hidden state at each position of a fresh prefill of token_ids."""
    from mindcpm import SamplingParams
    from mindcpm.engine.sequence import Sequence
    runner, blocks = llm.engine.runner, llm.engine.scheduler.block_manager
    seq = Sequence(token_ids, SamplingParams(), blocks.block_size)
    blocks.allocate(seq)
    seq.num_cached_tokens = 0
    try:
        inputs, _, width = runner.prepare([seq], [len(token_ids)], all_rows=True)
        hidden = runner._run_step(inputs)[2].asnumpy()
    finally:
        blocks.deallocate(seq)
    return hidden[:len(token_ids)]


def test_eagle3_logits_match_numpy_reference(tiny_dir, tmp_path):
    """EAGLE-3: the target's aux hidden states (3H) reduced by fc on the first step, the reduced
    head mapped back through a non-identity d2t."""
    from mindspore import Tensor
    from safetensors.numpy import load_file

    from mindcpm import SamplingParams
    from mindcpm.engine.sequence import Sequence
    tensors = make_eagle3_draft(str(tmp_path / "draft3"))
    llm = tiny_llm(tiny_dir, speculative_config=_eagle(str(tmp_path / "draft3"), method="eagle3"))
    drafter, blocks = llm.engine.proposer, llm.engine.scheduler.block_manager
    embed = load_file(os.path.join(tiny_dir, "model.safetensors"))["model.embed_tokens.weight"]
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, VOCAB, 9).tolist()
    hidden = rng.standard_normal((len(prompt), 3 * HIDDEN)).astype(np.float32)
    seq = Sequence(prompt, SamplingParams(), blocks.block_size)
    blocks.allocate(seq)

    def hidden_for(rows, w):
        x = np.zeros((rows, w, 3 * HIDDEN), np.float32)
        x[0, :len(prompt)] = hidden
        return Tensor(x)

    logits, ids, out = drafter._step([(prompt, 0, seq.block_table)], hidden_for)
    blocks.deallocate(seq)
    ref_logits, ref_out = reference_eagle3(tensors, embed, np.asarray(prompt), hidden)
    np.testing.assert_allclose(logits.asnumpy()[0], ref_logits[-1], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(out.asnumpy()[0], ref_out[-1], rtol=2e-4, atol=2e-5)
    best = int(np.argmax(ref_logits[-1]))
    assert ids[0] == best + int(tensors["d2t"][best]) != best


def test_eagle3_in_the_engine(tiny_dir, tmp_path, reference):
    """Greedy outputs equal the non-speculative engine's; the target hands over the input hidden
    states of AUX_LAYERS (layer 0's input is the embedding); the chains the engine drafts equal
    the reference head run from scratch over those hidden states."""
    from safetensors.numpy import load_file
    tensors = make_eagle3_draft(str(tmp_path / "draft3"))
    llm = tiny_llm(tiny_dir, max_model_len=128, max_num_seqs=8,
                   speculative_config=_eagle(str(tmp_path / "draft3"), method="eagle3"))
    captured = _capture_chains(llm)
    assert tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy())) == reference
    assert all_free(llm) and captured
    embed = load_file(os.path.join(tiny_dir, "model.safetensors"))["model.embed_tokens.weight"]
    for token_ids, drafts in captured[::4]:
        aux = _target_hidden(llm, token_ids[:-1])
        np.testing.assert_allclose(aux[:, HIDDEN:2 * HIDDEN], embed[token_ids[:-1]], rtol=1e-6)
        want = _reference_chain(lambda ids, h: reference_eagle3(tensors, embed, ids, h), token_ids, aux, len(drafts),
                                tensors["d2t"])
        assert drafts == want
