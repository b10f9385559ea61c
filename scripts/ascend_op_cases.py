"""What each Ascend op mindcpm uses must compute: worked examples and numpy goldens.

One list of op cases serves two checkers: scripts/validate_ascend.py runs them through the real
kernels on an NPU, and tests/ops/test_ascend_standins.py through the CPU stand-ins
(tests/ascend_standins.py, tests/ascend_moe_standins.py) before any model-level test trusts them.

Where the expectations come from (the data below is our own, generated with fixed seeds):
- the worked examples in the ops' MindSpore 2.10 docstrings (literal inputs and printed outputs);
- numpy goldens written from what MindSpore's own Ascend tests compute, in these files of the
  MindSpore tree (read in the mindspore-ai/mindspore_test mirror, 2025-07):
    ReshapeAndCache        tests/st/ops/ascend/test_internal_ops/test_reshape_and_cache.py
    PagedAttention         tests/st/ops/ascend/test_internal_ops/paged_attention_base.py
    FlashAttentionScore    tests/st/ops/test_ops_flash_attention_score.py,
                           tests/st/ops/ascend/test_internal_ops/test_flash_attention_score.py
    MoeGatingTopKSoftmax   tests/st/ops/ascend/test_moe_gating_top_k_softmax.py
    MoeInitRouting         tests/st/ops/ascend/test_moe_init_routing.py
    MoeComputeExpertTokens tests/st/ops/ascend/test_moe_compute_expert_tokens.py
    GroupedMatmul          tests/st/ops/test_ops_grouped_matmul.py (the 910B cases, weight [E, K, N])
    MoeFinalizeRouting     tests/st/ops/test_ops_moe_finalize_routing.py
    WeightQuantBatchMatmul tests/st/ops/ascend/test_fused_quant_kernels.py,
                           tests/st/ops/ascend/test_weight_quant_int4.py

Numerics: 16-bit inputs are rounded to their dtype first; a golden computes in float64 from
those values and its result is rounded to the output dtype once. A kernel that accumulates in
fp32 and rounds once lands within an ulp of that; the tolerance allows two ulps of the output
dtype, relative to the value and, for sums that may cancel, to the size of their terms.
Index outputs must match exactly.

This module needs only numpy to build cases; running one (run_case) imports mindspore.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

ULP = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23}


def round_to(x, dtype: str) -> np.ndarray:
    """x as the nearest values of `dtype` (float16/bfloat16/float32), held in float32."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":  # round to nearest even on the top 16 bits
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.astype(np.uint32).view(np.float32)
    return x


@dataclass
class Out:
    """An expected output: exact when rtol and atol are both 0."""
    value: np.ndarray
    rtol: float = 0.0
    atol: float = 0.0


def close(dtype: str, value, scale: float | None = None) -> Out:
    """Two ulps of `dtype`, relative to each value and to `scale` (the size of the terms that
    were summed; the largest |value| when not given)."""
    value = round_to(value, dtype)
    ulps = 2 * ULP[dtype]
    scale = float(np.abs(value).max()) if scale is None else scale
    return Out(value, ulps, ulps * scale)


def exact(value) -> Out:
    return Out(np.asarray(value))


@dataclass
class Arg:
    """A tensor input: its values, dtype name, and whether it is a Parameter the op writes."""
    value: np.ndarray
    dtype: str
    param: bool = False


@dataclass
class Case:
    op: str                    # the primitive's class name in mindspore.ops.auto_generate
    name: str
    source: str                # "docstring" or the MindSpore test file the golden follows
    attrs: dict                # constructor arguments
    args: list[Arg]            # the tensors, in the order `call` reads them
    call: Callable             # (op, tensors, consts) -> the op's result; parsed in graph mode
    read: Callable             # (result, tensors) -> tuple of outputs, in the order of `expect`
    expect: dict[str, Out]
    consts: tuple = ()
    cpu: bool = True           # False: the stand-ins cannot compute it on CPU (see `why`)
    why: str = ""
    dtype: str = field(default="")

    @property
    def label(self) -> str:
        return f"{self.op}: {self.name}"


# -- numpy goldens ------------------------------------------------------------------------------

def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def reshape_and_cache(key, key_cache, slots):
    """Token i (of prod(key.shape[:-1]) tokens) goes to [slot // block_size, slot % block_size]."""
    cache = key_cache.copy()
    block_size, heads, head_dim = cache.shape[1:]
    for token, slot in zip(key.reshape(-1, heads, head_dim), slots):
        cache[slot // block_size, slot % block_size] = token
    return cache


def paged_attention(query, key_cache, value_cache, tables, context_lens, scale, kv_heads):
    """Token t attends to positions 0..context_lens[t]-1 of its block table; query head h reads
    KV head h // (heads / kv_heads)."""
    t_count, heads = query.shape[0], query.shape[1]
    block_size, head_dim = key_cache.shape[1], key_cache.shape[3]
    q = query.reshape(t_count, heads, head_dim).astype(np.float64)
    group = heads // kv_heads
    out = np.empty_like(q)
    for t in range(t_count):
        pos = np.arange(context_lens[t])
        blocks = tables[t, pos // block_size]
        keys = key_cache[blocks, pos % block_size].astype(np.float64)  # [L, kv_heads, D]
        values = value_cache[blocks, pos % block_size].astype(np.float64)
        for h in range(heads):
            p = softmax(scale * keys[:, h // group] @ q[t, h])
            out[t, h] = p @ values[:, h // group]
    return out.reshape(query.shape)


def to_bnsd(x, layout, heads):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "SBH":
        x = x.transpose(1, 0, 2)
    b, s, h = x.shape
    return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)


def from_bnsd(x, layout):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    b, n, s, d = x.shape
    x = x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    return x.transpose(1, 0, 2) if layout == "SBH" else x


def flash_attention(query, key, value, heads, kv_heads, scale, layout, mask=None):
    """softmax(scale * q k^T, discarding keys where mask == 1) v; query head h reads KV head
    h // (heads / kv_heads); mask (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2)."""
    q = to_bnsd(query.astype(np.float64), layout, heads)
    k = np.repeat(to_bnsd(key.astype(np.float64), layout, kv_heads), heads // kv_heads, axis=1)
    v = np.repeat(to_bnsd(value.astype(np.float64), layout, kv_heads), heads // kv_heads, axis=1)
    scores = scale * q @ k.transpose(0, 1, 3, 2)
    if mask is not None:
        scores = np.where(np.broadcast_to(mask, scores.shape).astype(bool), -np.inf, scores)
    return from_bnsd(softmax(scores) @ v, layout)


def gating_topk_softmax(x, finished, k, dtype):
    """Softmax in fp32 rounded to x's dtype, then the k largest, ties to the lower expert;
    finished rows get expert id E; row_idx[i, j] = j * N + i."""
    n, num_experts = x.shape
    probs = round_to(softmax(x.astype(np.float32)), dtype)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    y = np.take_along_axis(probs, experts, -1)
    if finished is not None:
        experts = np.where(finished[:, None], num_experts, experts)
    row_idx = np.arange(n * k).reshape(k, n).T
    return y, experts.astype(np.int32), row_idx.astype(np.int32)


def init_routing(x, row_idx, expert_idx, active_num):
    """Assignments sorted by expert (stable in token-major order); expanded_row_idx maps the
    source row_idx value to its sorted position; expanded_x holds the first
    min(active_num, N) * k sorted rows."""
    n, k = expert_idx.shape
    order = np.argsort(expert_idx.reshape(-1), kind="stable")
    sorted_source = row_idx.reshape(-1)[order]
    expanded_row_idx = np.empty(n * k, np.int32)
    expanded_row_idx[sorted_source] = np.arange(n * k)
    rows = min(active_num, n) * k
    return x[sorted_source[:rows] % n], expanded_row_idx, expert_idx.reshape(-1)[order].astype(np.int32)


def compute_expert_tokens(sorted_experts, num_expert):
    """Per expert, the end of its rows in the sorted order (a cumulative count)."""
    return np.searchsorted(sorted_experts, np.arange(num_expert), side="right").astype(np.int32)


def grouped_matmul(x, weight, group_list, bias=None):
    """Rows [group_list[e-1], group_list[e]) of x times weight[e] ([E, K, N]), plus bias[e]."""
    out = np.zeros((x.shape[0], weight.shape[2]))
    start = 0
    for e, end in enumerate(group_list):
        out[start:end] = x[start:end].astype(np.float64) @ weight[e]
        if bias is not None:
            out[start:end] += bias[e]
        start = end
    return out


def finalize_routing(expanded_x, x1, x2, bias, scales, expanded_row_idx, expert_idx):
    """out[i] = x1[i] + x2[i] + sum_k scales[i, k] * (expanded_x[expanded_row_idx[i + k*N]]
    + bias[expert_idx[i, k]])."""
    n, k = scales.shape
    out = x1.astype(np.float64) + (0 if x2 is None else x2)
    for j in range(k):
        rows = expanded_x[expanded_row_idx[j * n + np.arange(n)]]
        out += scales[:, j:j + 1] * (rows + bias[expert_idx[:, j]])
    return out


def weight_quant_matmul(x, weight, scale, offset, group_size=0):
    """x @ ((weight + offset) * scale): int8 weight [K, N], scale/offset per output channel
    (N,) or per group of `group_size` input rows (K / group_size, N)."""
    w = weight.astype(np.float64)
    if group_size:
        scale, offset = (np.repeat(a, group_size, axis=0) for a in (scale, offset))
    return x.astype(np.float64) @ ((w + offset) * scale)


# -- how each op is called and read (graph-mode functions: tuples and constants only) -----------

def _call_cache_kv(op, t, c):
    return op(t[0], t[1], t[2], t[3], t[4])


def _call_cache_k(op, t, c):
    return op(t[0], None, t[1], None, t[2])


def _read_cache_kv(result, t):
    return t[2], t[3]


def _read_cache_k(result, t):
    return (t[1],)


def _call_paged(op, t, c):
    return op(t[0], t[1], t[2], t[3], t[4])


def _call_flash(op, t, c):
    return op(t[0], t[1], t[2])


def _call_flash_masked(op, t, c):
    return op(t[0], t[1], t[2], None, None, None, t[3])


def _read_attention_out(result, t):
    return (result[3],)


def _call_gating(op, t, c):
    return op(t[0], None, c[0])


def _call_gating_finished(op, t, c):
    return op(t[0], t[1], c[0])


def _call_init_routing(op, t, c):
    return op(t[0], t[1], t[2], c[0])


def _call_expert_tokens(op, t, c):
    return op(t[0], c[0])


def _call_gmm(op, t, c):
    return op([t[0]], [t[1]], None, None, None, None, None, t[2])


def _call_gmm_bias(op, t, c):
    return op([t[0]], [t[1]], [t[2]], None, None, None, None, t[3])


def _call_finalize(op, t, c):
    return op(t[0], t[1], None, t[2], t[3], t[4], t[5])


def _call_finalize_x2(op, t, c):
    return op(t[0], t[1], t[2], t[3], t[4], t[5], t[6])


def _call_wqbm(op, t, c):
    return op(t[0], t[1], t[2], t[3], None, None, None)


def _read_all(result, t):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _read_first(result, t):
    return (result[0],)


# -- the cases ----------------------------------------------------------------------------------

def _uniform(rng, shape, low, high, dtype):
    return round_to(rng.uniform(low, high, shape), dtype)


NO_BF16_WRITE = ("MindSpore 2.10 has no CPU kernel that writes a bfloat16 Parameter "
                 "(Assign/ScatterNdUpdate), so the stand-in cannot update a bf16 cache here")


def reshape_and_cache_cases(dtype):
    rng = np.random.default_rng(11)
    blocks, block_size, heads, head_dim = 6, 16, 2, 32
    b, s = 3, 5  # key as (b, s, heads*head_dim), as MindSpore's test passes it
    slots = rng.permutation(blocks * block_size)[:b * s].astype(np.int32)
    key, value = (_uniform(rng, (b, s, heads * head_dim), -1, 1, dtype) for _ in range(2))
    caches = [_uniform(rng, (blocks, block_size, heads, head_dim), -1, 1, dtype) for _ in range(2)]
    src = "tests/st/ops/ascend/test_internal_ops/test_reshape_and_cache.py"
    kw = dict(cpu=dtype != "bfloat16", why=NO_BF16_WRITE if dtype == "bfloat16" else "")
    both = Case("ReshapeAndCache", f"key and value (b, s, h*d) into scattered slots, {dtype}", src, {},
                [Arg(key, dtype), Arg(value, dtype), Arg(caches[0], dtype, True), Arg(caches[1], dtype, True),
                 Arg(slots, "int32")], _call_cache_kv, _read_cache_kv,
                {"key_cache": exact(reshape_and_cache(key, caches[0], slots)),
                 "value_cache": exact(reshape_and_cache(value, caches[1], slots))}, **kw)
    key2d = key.reshape(b * s, -1)
    key_only = Case("ReshapeAndCache", f"key only, (tokens, h*d), {dtype}", src, {},
                    [Arg(key2d, dtype), Arg(caches[0], dtype, True), Arg(slots, "int32")],
                    _call_cache_k, _read_cache_k, {"key_cache": exact(reshape_and_cache(key2d, caches[0], slots))},
                    **kw)
    return [both, key_only]


def paged_attention_case(dtype, heads, kv_heads, head_dim, block_size, context_lens, name, seed):
    rng = np.random.default_rng(seed)
    t_count = len(context_lens)
    width = -(-max(context_lens) // block_size)
    blocks = t_count * width + 1
    tables = rng.permutation(blocks)[:t_count * width].reshape(t_count, width).astype(np.int32)
    query = _uniform(rng, (t_count, heads, head_dim), -1, 1, dtype)
    caches = [_uniform(rng, (blocks, block_size, kv_heads, head_dim), -1, 1, dtype) for _ in range(2)]
    lens = np.asarray(context_lens, np.int32)
    scale = 1.0 / np.sqrt(head_dim)
    out = paged_attention(query, caches[0], caches[1], tables, lens, scale, kv_heads)
    return Case("PagedAttention", f"{name}, {dtype}", "tests/st/ops/ascend/test_internal_ops/paged_attention_base.py",
                dict(head_num=heads, scale_value=float(scale), kv_head_num=kv_heads),
                [Arg(query, dtype), Arg(caches[0], dtype, True), Arg(caches[1], dtype, True), Arg(tables, "int32"),
                 Arg(lens, "int32")], _call_paged, _read_all,
                {"attention_out": close(dtype, out, float(np.abs(caches[1]).max()))})


def paged_attention_cases(dtype):
    return [paged_attention_case(dtype, 4, 2, 32, 16, [1, 17, 40], "GQA 4:2, contexts 1/17/40 over scattered blocks",
                                 21),
            # The docstring's configuration (as many KV heads as query heads, head_dim 128,
            # block 16), at a size the CPU computes quickly.
            paged_attention_case(dtype, 2, 2, 128, 16, [33, 5], "docstring shape: MHA, head_dim 128, block 16", 22)]


def flash_attention_case(dtype, layout, heads, kv_heads, head_dim, b, s1, s2, mask_kind, name, seed):
    rng = np.random.default_rng(seed)
    dims = {"BSH": lambda n, s: (b, s, n * head_dim), "BNSD": lambda n, s: (b, n, s, head_dim),
            "BSND": lambda n, s: (b, s, n, head_dim), "SBH": lambda n, s: (s, b, n * head_dim)}[layout]
    query = _uniform(rng, dims(heads, s1), -1, 1, dtype)
    key, value = (_uniform(rng, dims(kv_heads, s2), -1, 1, dtype) for _ in range(2))
    scale = 1.0 / np.sqrt(head_dim)
    attrs = dict(head_num=heads, scale_value=float(scale), input_layout=layout, sparse_mode=0)
    args = [Arg(query, dtype), Arg(key, dtype), Arg(value, dtype)]
    mask = None
    if mask_kind:  # causal for a chunk whose queries are the last s1 of s2 positions; 1 = discard
        causal = np.arange(s2)[None, :] > (s2 - s1 + np.arange(s1))[:, None]
        mask = causal if mask_kind == "bool (S1, S2)" else np.broadcast_to(causal, (b, 1, s1, s2))
        mask_dtype = "bool" if mask_kind.startswith("bool") else "uint8"
        args.append(Arg(mask.astype(np.uint8 if mask_dtype == "uint8" else bool), mask_dtype))
    out = flash_attention(query, key, value, heads, kv_heads, scale, layout, mask)
    return Case("FlashAttentionScore", f"{name}, {dtype}",
                "tests/st/ops/test_ops_flash_attention_score.py (fas_forward)", attrs, args,
                _call_flash_masked if mask_kind else _call_flash, _read_attention_out,
                {"attention_out": close(dtype, out, float(np.abs(value).max()))})


def flash_attention_cases(dtype):
    return [flash_attention_case(dtype, "BSH", 4, 2, 32, 2, 6, 16, "uint8 (B, 1, S1, S2)",
                                 "BSH GQA 4:2, a 6-token chunk after 10 cached, causal uint8 mask", 31),
            flash_attention_case(dtype, "BNSD", 2, 2, 16, 1, 5, 7, "", "BNSD, no mask", 32),
            flash_attention_case(dtype, "BSND", 2, 1, 64, 1, 4, 4, "bool (S1, S2)",
                                 "BSND MQA 2:1, causal bool (S1, S2) mask", 33),
            # One key: every query returns that value (fas_forward's one-token case).
            flash_attention_case(dtype, "BNSD", 1, 1, 16, 1, 1, 1, "", "one query, one key", 34)]


DOC_GATING_X = [[0.1, 0.2, 0.1, 0.1], [0.2, 0.2, 0.4, 0.2], [0.3, 0.3, 0.1, 0.3], [0.1, 0.7, 0.1, 0.1]]
DOC_GATING_Y = [[0.2693, 0.2437, 0.2437, 0.2437], [0.2893, 0.2369, 0.2369, 0.2369],
                [0.262, 0.262, 0.262, 0.2144], [0.378, 0.2074, 0.2074, 0.2074]]


def _separated_logits(rng, n, num_experts, k, dtype):
    """Router logits whose top k+1 softmax values differ by more than two ulps of `dtype`, so
    a kernel ranking in fp32 and one ranking in `dtype` pick the same experts in the same order."""
    while True:
        x = _uniform(rng, (n, num_experts), -1, 1, dtype)
        top = -np.sort(-softmax(x), axis=-1)[:, :k + 1]
        if (np.diff(-top, axis=-1) > 2 * ULP[dtype] * top[:, 1:]).all():
            return x


def gating_cases(dtype):
    src = "tests/st/ops/ascend/test_moe_gating_top_k_softmax.py"
    rng = np.random.default_rng(41)
    x = _separated_logits(rng, 10, 16, 2, dtype)
    finished = rng.uniform(size=10) < 0.3
    y, experts, rows = gating_topk_softmax(x, None, 2, dtype)
    yf, experts_f, _ = gating_topk_softmax(x, finished, 2, dtype)
    cases = [
        Case("MoeGatingTopKSoftmax", f"10 tokens, 16 experts, k=2, {dtype}", src, {}, [Arg(x, dtype)],
             _call_gating, _read_all,
             {"y": close(dtype, y), "expert_idx": exact(experts), "row_idx": exact(rows)}, consts=(2,)),
        Case("MoeGatingTopKSoftmax", f"with `finished` rows (expert id E), {dtype}", src, {},
             [Arg(x, dtype), Arg(finished, "bool")], _call_gating_finished, _read_all,
             {"y": close(dtype, yf), "expert_idx": exact(experts_f), "row_idx": exact(rows)}, consts=(2,))]
    if dtype == "float16":  # the docstring example is fp16: all rows finished, k = 4
        x = round_to(DOC_GATING_X, dtype)
        _, _, rows = gating_topk_softmax(x, None, 4, dtype)
        cases.append(Case("MoeGatingTopKSoftmax", "docstring example (finished all True, k=4)", "docstring", {},
                          [Arg(x, dtype), Arg(np.ones(4, bool), "bool")], _call_gating_finished, _read_all,
                          {"y": Out(round_to(DOC_GATING_Y, dtype), ULP[dtype], ULP[dtype] * 0.25),
                           "expert_idx": exact(np.full((4, 4), 4, np.int32)), "row_idx": exact(rows)},
                          consts=(4,)))
    return cases


def init_routing_cases(dtype):
    src = "tests/st/ops/ascend/test_moe_init_routing.py"
    rng = np.random.default_rng(51)
    n, k, hidden, num_experts = 10, 2, 24, 6
    x = _uniform(rng, (n, hidden), -1, 1, dtype)
    row_idx = np.arange(n * k).reshape(k, n).T.astype(np.int32)
    expert_idx = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(n)]).astype(np.int32)
    cases = []
    for active in (n, 4):
        ex, er, ee = init_routing(x, row_idx, expert_idx, active)
        cases.append(Case("MoeInitRouting", f"{n} tokens, k={k}, {num_experts} experts, active_num={active}, {dtype}",
                          src, {}, [Arg(x, dtype), Arg(row_idx, "int32"), Arg(expert_idx, "int32")],
                          _call_init_routing, _read_all,
                          {"expanded_x": exact(ex), "expanded_row_idx": exact(er), "expanded_expert_idx": exact(ee)},
                          consts=(active,)))
    return cases


def expert_tokens_cases():
    src = "tests/st/ops/ascend/test_moe_compute_expert_tokens.py"
    rng = np.random.default_rng(61)
    sorted_experts = np.sort(rng.integers(0, 9, 50)).astype(np.int32)
    doc = np.array([0, 0, 1, 2, 2], np.int32)
    # The docstring prints [2, 3, 5] for num_expert=5, but the op's inferred shape is
    # (num_expert,) and MindSpore's test golden (searchsorted) gives [2, 3, 5, 5, 5]: the
    # printed values are its first three.
    return [Case("MoeComputeExpertTokens", "docstring example (num_expert=5)", "docstring + " + src, {},
                 [Arg(doc, "int32")], _call_expert_tokens, _read_all,
                 {"expert_tokens": exact([2, 3, 5, 5, 5])}, consts=(5,)),
            Case("MoeComputeExpertTokens", "50 sorted ids, 11 experts (two never chosen)", src, {},
                 [Arg(sorted_experts, "int32")], _call_expert_tokens, _read_all,
                 {"expert_tokens": exact(compute_expert_tokens(sorted_experts, 11))}, consts=(11,))]


DOC_GMM_X = [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]]
DOC_GMM_Y = [[0, 0], [44, 48], [88, 96], [152, 160], [108, 112], [108, 112]]


def _gmm_case(dtype, name, src, x, weight, group_list, bias=None, expect=None):
    # CANN takes no bf16 bias: with bf16 x it is fp32 (ops-transformer gmm/grouped_matmul/README.md).
    bias_dtype = "float32" if dtype == "bfloat16" else dtype
    args = [Arg(x, dtype), Arg(weight, dtype)] + ([Arg(bias, bias_dtype)] if bias is not None else [])
    args.append(Arg(np.asarray(group_list, np.int64), "int64"))
    out = grouped_matmul(x, weight, group_list, bias) if expect is None else expect
    terms = float(np.abs(x).max() * np.abs(weight).max() * x.shape[1])
    return Case("GroupedMatmul", f"{name}, {dtype}", src, dict(split_item=3, group_type=0), args,
                _call_gmm if bias is None else _call_gmm_bias, _read_first, {"y": close(dtype, out, terms)})


def grouped_matmul_cases(dtype):
    src = "tests/st/ops/test_ops_grouped_matmul.py"
    rng = np.random.default_rng(71)
    m, k, n = 20, 32, 24
    x = _uniform(rng, (m, k), 0.1, 2, dtype)
    weight = _uniform(rng, (5, k, n), 0.1, 1, dtype)
    bias = _uniform(rng, (5, n), 0.1, 1, dtype)
    group_list = [3, 3, 11, 12, m]  # expert 1 gets no rows
    cases = [_gmm_case(dtype, "x [20, 32], weight [E=5, 32, 24], an empty group", src, x, weight, group_list),
             _gmm_case(dtype, "with bias [E, N]", src, x, weight, group_list, bias)]
    if dtype == "float16":
        doc_w = np.arange(32, dtype=np.float32).reshape(4, 4, 2)
        cases.append(_gmm_case(dtype, "docstring example", "docstring", np.asarray(DOC_GMM_X, np.float32), doc_w,
                               [1, 3, 4, 6], expect=np.asarray(DOC_GMM_Y, np.float32)))
    return cases


DOC_FIN = dict(expanded_x=[[0.1] * 4, [0.2] * 4, [0.3] * 4, [0.1] * 4, [0.2] * 4, [0.3] * 4],
               x1=[[1] * 4, [0.2] * 4, [0.3] * 4], bias=[[0.1] * 4, [0.2] * 4, [0.3] * 4, [0.4] * 4],
               scales=[[0.7, 0.3], [0.8, 0.2], [0.8, 0.2]], expanded_row_idx=[2, 3, 1, 0, 5, 4],
               expanded_expert_idx=[[0, 1], [0, 2], [1, 3]], out=[[1.37] * 4, [0.48] * 4, [0.74] * 4])


def _finalize_case(dtype, name, src, ex, x1, x2, bias, scales, rows, experts, expect=None):
    args = [Arg(ex, dtype), Arg(x1, dtype)] + ([Arg(x2, dtype)] if x2 is not None else [])
    args += [Arg(bias, dtype), Arg(scales, dtype), Arg(rows, "int32"), Arg(experts, "int32")]
    out = finalize_routing(ex, x1, x2, bias, scales, rows, experts) if expect is None else expect
    terms = float(np.abs(x1).max() + (0 if x2 is None else np.abs(x2).max())
                  + np.abs(scales).sum(1).max() * (np.abs(ex).max() + np.abs(bias).max()))
    return Case("MoeFinalizeRouting", f"{name}, {dtype}", src, {}, args,
                _call_finalize if x2 is None else _call_finalize_x2, _read_all, {"out": close(dtype, out, terms)})


def finalize_routing_cases(dtype):
    src = "tests/st/ops/test_ops_moe_finalize_routing.py"
    rng = np.random.default_rng(81)
    n, k, hidden, num_experts = 6, 2, 8, 5
    ex = _uniform(rng, (n * k, hidden), 0, 1, dtype)
    x1, x2 = (_uniform(rng, (n, hidden), 0, 1, dtype) for _ in range(2))
    bias = _uniform(rng, (num_experts, hidden), 0, 1, dtype)
    scales = _uniform(rng, (n, k), 0, 1, dtype)
    rows = rng.permutation(n * k).astype(np.int32)
    experts = rng.integers(0, num_experts, (n, k)).astype(np.int32)
    cases = [_finalize_case(dtype, "6 tokens, k=2, 5 experts, no x2", src, ex, x1, None, bias, scales, rows, experts),
             _finalize_case(dtype, "with x2", src, ex, x1, x2, bias, scales, rows, experts)]
    if dtype == "float16":
        d = {key: np.asarray(v) for key, v in DOC_FIN.items()}
        cases.append(_finalize_case(dtype, "docstring example", "docstring", round_to(d["expanded_x"], dtype),
                                    round_to(d["x1"], dtype), None, round_to(d["bias"], dtype),
                                    round_to(d["scales"], dtype), d["expanded_row_idx"].astype(np.int32),
                                    d["expanded_expert_idx"].astype(np.int32), expect=d["out"]))
    return cases


def weight_quant_cases(dtype):
    """W8A16 with a per-channel and a per-group antiquant scale/offset, as
    test_fused_quant_kernels.py's AntiquantBMMCell passes them (the offset is added)."""
    src = "tests/st/ops/ascend/test_fused_quant_kernels.py"
    rng = np.random.default_rng(91)
    m, k, n, group = 3, 64, 16, 32
    x = _uniform(rng, (m, k), -1, 1, dtype)
    weight = rng.integers(-128, 128, (k, n)).astype(np.int8)
    cases = []
    for name, shape, group_size in (("per-channel", (n,), 0), ("per-group of 32", (k // group, n), group)):
        scale = _uniform(rng, shape, 0.001, 0.01, dtype)
        offset = round_to(rng.integers(-8, 8, shape), dtype)
        out = weight_quant_matmul(x, weight, scale, offset, group_size)
        terms = float(np.abs(x).max() * 136 * np.abs(scale).max() * k)
        cases.append(Case("WeightQuantBatchMatmul", f"int8 weight [{k}, {n}], {name}, {dtype}", src,
                          dict(transpose_x=False, transpose_weight=False, antiquant_group_size=group_size),
                          [Arg(x, dtype), Arg(weight, "int8"), Arg(scale, dtype), Arg(offset, dtype)],
                          _call_wqbm, _read_all, {"y": close(dtype, out, terms)}))
    return cases


BUILDERS = {
    "ReshapeAndCache": reshape_and_cache_cases,
    "PagedAttention": paged_attention_cases,
    "FlashAttentionScore": flash_attention_cases,
    "MoeGatingTopKSoftmax": gating_cases,
    "MoeInitRouting": init_routing_cases,
    "MoeComputeExpertTokens": lambda dtype: expert_tokens_cases() if dtype == "float16" else [],
    "GroupedMatmul": grouped_matmul_cases,
    "MoeFinalizeRouting": finalize_routing_cases,
    "WeightQuantBatchMatmul": weight_quant_cases,
}


def all_cases(ops=None, dtypes=("float16", "bfloat16")) -> list[Case]:
    """Every case of the ops listed (all of BUILDERS by default) in each activation dtype."""
    cases = []
    for op in BUILDERS if ops is None else ops:
        for dtype in dtypes:
            for case in BUILDERS[op](dtype):
                case.dtype = dtype
                cases.append(case)
    return cases


# -- running a case -----------------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    ok: bool
    detail: str  # the worst output: its error and the allowed error


def _to_tensor(arg: Arg):
    import mindspore as ms
    tensor = ms.Tensor(arg.value, getattr(ms, "bool_" if arg.dtype == "bool" else arg.dtype))
    return ms.Parameter(tensor, requires_grad=False) if arg.param else tensor


def _to_numpy(tensor) -> np.ndarray:
    import mindspore as ms
    if not isinstance(tensor, ms.Tensor):
        return np.asarray(tensor)
    if tensor.dtype == ms.bfloat16:
        tensor = tensor.astype(ms.float32)
    return tensor.asnumpy()


def compare(expect: dict[str, Out], got: tuple) -> tuple[bool, str]:
    """(all outputs within tolerance, a description of the worst one)."""
    if len(got) != len(expect):
        return False, f"{len(got)} outputs, expected {len(expect)}"
    worst, worst_ratio = "", -1.0
    for (name, out), value in zip(expect.items(), got):
        value = np.asarray(value)
        if value.shape != out.value.shape:
            return False, f"{name}: shape {value.shape}, expected {out.value.shape}"
        err = np.abs(value.astype(np.float64) - out.value)
        allowed = out.atol + out.rtol * np.abs(out.value)
        bad = ~(err <= allowed)  # NaN counts as bad
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(err == 0, 0.0, np.where(allowed > 0, err / allowed, np.inf))
        ratio = float(np.where(np.isnan(ratio), np.inf, ratio).max()) if err.size else 0.0
        if bad.any():
            finite = err[~np.isnan(err)]
            nan = f", {err.size - finite.size} NaN" if finite.size < err.size else ""
            largest = f"{finite.max():.3g}" if finite.size else "NaN"
            return False, f"{name}: max error {largest}, {int(bad.sum())} of {bad.size} values outside{nan}"
        if ratio > worst_ratio:
            limit = "exact" if out.rtol == out.atol == 0 else f"{ratio:.2f} of allowed"
            worst, worst_ratio = f"{name}: max error {err.max() if err.size else 0:.3g} ({limit})", ratio
    return True, worst


def run_case(case: Case, kernels) -> Result:
    """Runs `case` through kernels[case.op] (a primitive class: the real one or a stand-in),
    compiled as the engine compiles its step (ms.jit), and compares with the expectation."""
    import mindspore as ms
    from mindspore import nn

    op = kernels[case.op](**case.attrs)

    class OpCell(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op, self.consts = op, case.consts

        @ms.jit
        def construct(self, *tensors):
            return case.call(self.op, tensors, self.consts)

    tensors = [_to_tensor(a) for a in case.args]
    result = OpCell()(*tensors)
    got = tuple(_to_numpy(t) for t in case.read(result, tensors))
    return Result(case, *compare(case.expect, got))


# Ops that are not MindSpore primitives (custom kernels): op name -> a function returning the
# class to call, in the primitive's calling convention.
CUSTOM_KERNELS: dict[str, Callable] = {}


def real_kernels(ops=None) -> dict:
    """The device kernels of `ops` (all of BUILDERS by default): MindSpore's primitives, or the
    custom kernels registered in CUSTOM_KERNELS."""
    from mindspore.ops import auto_generate
    return {op: CUSTOM_KERNELS[op]() if op in CUSTOM_KERNELS else getattr(auto_generate, op)
            for op in ops or BUILDERS}
