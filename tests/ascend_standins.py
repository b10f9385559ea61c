"""CPU stand-ins for the Ascend kernels ReshapeAndCache, PagedAttention and FlashAttentionScore.

Written from the ops' MindSpore 2.10 docstrings and MindSpore's own Ascend tests, not from our
backend: each is a composite nn.Cell of CPU ops with the op's constructor and call signature,
and it asserts the op's contract on the shapes, dtypes and attributes it receives.
tests/ops/test_ascend_standins.py first checks each against the worked examples and numpy goldens of
scripts/ascend_op_cases.py (the cases scripts/validate_ascend.py runs on an NPU).

The checks run in Python when the call is traced (a graph compile, or every PyNative call) and
count the call in CALLS. They cannot see tensor values; where the result for a value is
undefined (a query with no visible key, a context longer than its block table) the stand-in
returns NaN so that a test notices any reliance on it.

Refused as the real ops refuse them: fp32 (the three kernels take fp16/bf16; MindSpore's own
inference rejects fp32 for ReshapeAndCache and PagedAttention), index and length inputs other
than int32, FlashAttentionScore masks other than bool/uint8 (1 = discard), and PagedAttention
block sizes outside {16, 32, 64, 128} or head_dim * block_size > 16384 (what the internal
kernel takes; MindSpore's paged_attention_base.py tests only those block sizes).

Numerics, as assumed of the device: inputs are widened to fp32, everything is computed in fp32
and the result is rounded to the input dtype once. On CPU, MindSpore 2.10 has no bf16 kernel
that writes a Parameter, so ReshapeAndCache checks but cannot compute a bf16 call here.

    install_standins(monkeypatch)   # from a test or fixture: patches mindcpm.ops.ascend
"""
from __future__ import annotations

import math
from collections import Counter

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

# Trace-time calls per op name ("ReshapeAndCache", "PagedAttention", "FlashAttentionScore").
CALLS: Counter = Counter()

REAL_DTYPES = (ms.float16, ms.bfloat16)
INT32 = ms.int32
PAGED_BLOCK_SIZES = (16, 32, 64, 128)
PAGED_MAX_BLOCK_ELEMENTS = 16384  # head_dim * block_size
MASK_DTYPES = (ms.bool_, ms.uint8)
NEG_INF = float("-inf")
NAN = float("nan")


def install_standins(monkeypatch) -> Counter:
    """Replaces the kernels in mindcpm.ops.ascend with the stand-ins, once they have shown that
    they reproduce their ops' examples (verify), and returns the call counter (cleared). Also
    turns the compile cache off: a graph loaded from the cache is not traced, so its calls would
    be neither checked nor counted."""
    import mindcpm.ops.ascend as ascend
    verify(ATTENTION_STANDINS)
    for name, standin in ATTENTION_STANDINS.items():
        monkeypatch.setattr(ascend, name, standin)
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "0")
    CALLS.clear()
    return CALLS


_VERIFIED: set = set()  # (op name, stand-in class) pairs that reproduced their cases


def verify(standins: dict) -> None:
    """Once per process and op: the stand-in must reproduce its op's docstring examples and its
    first numpy golden (scripts/ascend_op_cases.py; tests/ops/test_ascend_standins.py runs them all)
    before a model-level test may rely on it."""
    from scripts.ascend_op_cases import all_cases, run_case
    todo = [op for op, standin in standins.items() if (op, standin) not in _VERIFIED]
    seen = set()
    for case in all_cases(todo, ("float16",)):
        if case.op in seen and not case.source.startswith("docstring"):
            continue
        seen.add(case.op)
        result = run_case(case, standins)
        _require(result.ok, case.op, f"the stand-in does not reproduce {case.label} ({case.source}): {result.detail}")
    _VERIFIED.update((op, standins[op]) for op in todo)


def _fail(op: str, message: str):
    raise AssertionError(f"{op} contract: {message}")


def _require(cond: bool, op: str, message: str) -> None:
    if not cond:
        _fail(op, message)


def _dtype_ok(op: str, name: str, dtype, allowed) -> None:
    _require(dtype in allowed, op, f"{name} must be one of {allowed}, got {dtype}")


# --------------------------------------------------------------------------------------------
# ReshapeAndCache(key, value=None, key_cache=None, value_cache=None, slot_mapping=None)
#   for each token i: cache[slot_i // block_size, slot_i % block_size] = key_i.reshape(heads, head_dim)
#   caches (num_blocks, block_size, num_head, head_dim); slot_mapping int32 (num_tokens,);
#   the op's num_tokens is prod(key.shape[:-1]) (verified on the installed infer).
# --------------------------------------------------------------------------------------------
@constexpr
def _check_reshape_and_cache(key_shape, key_dtype, value_shape, value_dtype, kc_shape, kc_dtype,
                             vc_shape, vc_dtype, slot_shape, slot_dtype):
    op = "ReshapeAndCache"
    CALLS[op] += 1
    _require(kc_shape is not None and slot_shape is not None, op, "key_cache and slot_mapping are required")
    _require(len(kc_shape) == 4, op, f"key_cache must be (num_blocks, block_size, num_head, head_dim), got {kc_shape}")
    _dtype_ok(op, "key", key_dtype, REAL_DTYPES)
    _require(kc_dtype == key_dtype, op, f"key_cache dtype {kc_dtype} differs from key dtype {key_dtype}")
    _require(slot_dtype == INT32, op, f"slot_mapping must be int32, got {slot_dtype}")
    _require(len(slot_shape) == 1, op, f"slot_mapping must be (num_tokens,), got {slot_shape}")
    num_tokens = math.prod(key_shape[:-1])
    _require(num_tokens == slot_shape[0], op,
             f"The num_tokens of slot mapping and key must be the same, but got slot mapping num_tokens: "
             f"{slot_shape[0]}, key num_tokens: {num_tokens} (num_tokens is prod(key.shape[:-1]))")
    per_token = math.prod(key_shape) // num_tokens
    _require(per_token == kc_shape[2] * kc_shape[3], op,
             f"a token of key has {per_token} values, a cache slot {kc_shape[2]}x{kc_shape[3]}")
    if value_shape is not None:
        _require(vc_shape is not None, op, "value without value_cache")
        _require(tuple(value_shape) == tuple(key_shape), op, f"value {value_shape} and key {key_shape} differ")
        _require(tuple(vc_shape) == tuple(kc_shape), op, f"value_cache {vc_shape} and key_cache {kc_shape} differ")
        _require(value_dtype == key_dtype and vc_dtype == kc_dtype, op, "value/value_cache dtypes differ from key's")
    return True


class ReshapeAndCacheStandIn(nn.Cell):
    def __init__(self):
        super().__init__()

    def construct(self, key, value=None, key_cache=None, value_cache=None, slot_mapping=None):
        if value is None:
            _check_reshape_and_cache(key.shape, key.dtype, None, None, key_cache.shape, key_cache.dtype,
                                     None, None, slot_mapping.shape, slot_mapping.dtype)
        else:
            _check_reshape_and_cache(key.shape, key.dtype, value.shape, value.dtype, key_cache.shape,
                                     key_cache.dtype, value_cache.shape, value_cache.dtype,
                                     slot_mapping.shape, slot_mapping.dtype)
        block_size, heads, head_dim = key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
        t = slot_mapping.shape[0]
        index = ops.stack((slot_mapping // block_size, slot_mapping % block_size), 1)  # [T, 2]
        written = ops.scatter_nd_update(key_cache, index, key.reshape(t, heads, head_dim))
        out = ops.depend(key, written)
        if value is not None:
            written_v = ops.scatter_nd_update(value_cache, index, value.reshape(t, heads, head_dim))
            out = ops.depend(out, written_v)
        return out


# --------------------------------------------------------------------------------------------
# PagedAttention(head_num, scale_value, kv_head_num, kv_cache_quant_mode='DEFAULT',
#                mask_mode='MASK_DEFAULT', mla_v_dim=0)
#   (query, key_cache, value_cache=None, block_tables=None, context_lens=None, antiquant_scale=None,
#    antiquant_offset=None, attn_mask=None, q_seq_lens=None, alibi_mask=None)
#   query (num_tokens, num_head, head_dim) (the installed infer also takes (num_tokens, num_head*head_dim));
#   caches (num_blocks, block_size, kv_head_num, head_dim); block_tables int32 (num_tokens, max_blocks);
#   context_lens int32 (num_tokens,) (MindSpore's tests and vllm-mindspore name this graph input
#   batch_valid_length). Token t attends to positions 0..context_lens[t]-1 of its table, position
#   p at [block_tables[t, p // block_size], p % block_size]; query head n uses KV head
#   n // (head_num / kv_head_num). Output: the query's shape and dtype.
#   Implemented: the default path, optionally with q_seq_lens int32 (num_tokens,) of ones (one
#   query per sequence, as in decode); no quantisation, masks or alibi.
# --------------------------------------------------------------------------------------------
@constexpr
def _check_paged_attention(head_num, kv_head_num, q_shape, q_dtype, kc_shape, kc_dtype, vc_shape, vc_dtype,
                           bt_shape, bt_dtype, cl_shape, cl_dtype, qs_shape, qs_dtype, extras_none):
    op = "PagedAttention"
    CALLS[op] += 1
    _require(extras_none, op, "the stand-in implements no antiquant / attn_mask / alibi_mask")
    _require(len(kc_shape) == 4, op, f"key_cache must be (num_blocks, block_size, kv_head_num, head_dim), got {kc_shape}")
    _require(tuple(vc_shape) == tuple(kc_shape), op, f"value_cache {vc_shape} and key_cache {kc_shape} differ")
    _require(kc_shape[2] == kv_head_num, op, f"cache has {kc_shape[2]} heads, kv_head_num is {kv_head_num}")
    _require(head_num % kv_head_num == 0, op, f"head_num {head_num} is not a multiple of kv_head_num {kv_head_num}")
    block_size, head_dim = kc_shape[1], kc_shape[3]
    _require(block_size in PAGED_BLOCK_SIZES, op, f"block_size {block_size} is not one of {PAGED_BLOCK_SIZES}")
    _require(head_dim * block_size <= PAGED_MAX_BLOCK_ELEMENTS, op,
             f"head_dim {head_dim} x block_size {block_size} exceeds {PAGED_MAX_BLOCK_ELEMENTS}")
    if len(q_shape) == 3:
        _require(q_shape[1] == head_num and q_shape[2] == head_dim, op,
                 f"query must be (num_tokens, {head_num}, {head_dim}), got {q_shape}")
    else:
        _require(len(q_shape) == 2 and q_shape[1] == head_num * head_dim, op,
                 f"query must be (num_tokens, {head_num}, {head_dim}) or (num_tokens, {head_num * head_dim}), got {q_shape}")
    _dtype_ok(op, "query", q_dtype, REAL_DTYPES)
    _require(kc_dtype == q_dtype and vc_dtype == q_dtype, op, f"query {q_dtype} and caches {kc_dtype}/{vc_dtype} differ")
    num_tokens = q_shape[0]
    _require(bt_dtype == INT32, op, f"block_tables must be int32, got {bt_dtype}")
    _require(len(bt_shape) == 2 and bt_shape[0] == num_tokens, op,
             f"block_tables must be ({num_tokens}, max_num_blocks_per_batch), got {bt_shape}")
    _require(cl_dtype == INT32, op, f"context_lens must be int32, got {cl_dtype}")
    _require(tuple(cl_shape) == (num_tokens,), op, f"context_lens must be ({num_tokens},), got {cl_shape}")
    if qs_shape is not None:
        _require(qs_dtype == INT32, op, f"q_seq_lens must be int32, got {qs_dtype}")
        _require(tuple(qs_shape) == (num_tokens,), op,
                 f"q_seq_lens must be ({num_tokens},): the stand-in implements one query per sequence")
    return True


class PagedAttentionStandIn(nn.Cell):
    def __init__(self, head_num, scale_value, kv_head_num, kv_cache_quant_mode="DEFAULT",
                 mask_mode="MASK_DEFAULT", mla_v_dim=0):
        super().__init__()
        _require(isinstance(head_num, int) and head_num > 0, "PagedAttention", f"head_num {head_num!r}")
        _require(isinstance(kv_head_num, int) and kv_head_num > 0, "PagedAttention", f"kv_head_num {kv_head_num!r}")
        _require(isinstance(scale_value, float), "PagedAttention", f"scale_value must be a float, got {scale_value!r}")
        _require(kv_cache_quant_mode == "DEFAULT" and mask_mode == "MASK_DEFAULT" and mla_v_dim == 0,
                 "PagedAttention", "the stand-in implements only the default modes")
        self.head_num, self.kv_head_num, self.scale_value = head_num, kv_head_num, scale_value
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.weighted = ops.BatchMatMul()

    def construct(self, query, key_cache, value_cache=None, block_tables=None, context_lens=None,
                  antiquant_scale=None, antiquant_offset=None, attn_mask=None, q_seq_lens=None, alibi_mask=None):
        extras_none = (antiquant_scale is None and antiquant_offset is None and attn_mask is None
                       and alibi_mask is None)
        qs_shape, qs_dtype = (None, None) if q_seq_lens is None else (q_seq_lens.shape, q_seq_lens.dtype)
        _check_paged_attention(self.head_num, self.kv_head_num, query.shape, query.dtype, key_cache.shape,
                               key_cache.dtype, value_cache.shape, value_cache.dtype, block_tables.shape,
                               block_tables.dtype, context_lens.shape, context_lens.dtype, qs_shape, qs_dtype,
                               extras_none)
        num_blocks, block_size, nkv, d = key_cache.shape
        t, max_blocks = block_tables.shape
        n = self.head_num
        group = n // nkv
        s = max_blocks * block_size
        table = ops.clip(block_tables, 0, num_blocks - 1)
        # Widened before the gather: MindSpore's CPU Gather has no bf16 kernel.
        keys = ops.gather(key_cache.astype(ms.float32), table, 0).reshape(t, s, nkv, d).transpose(0, 2, 1, 3)
        values = ops.gather(value_cache.astype(ms.float32), table, 0).reshape(t, s, nkv, d).transpose(0, 2, 1, 3)
        q = query.astype(ms.float32).reshape(t, nkv, group, d)  # head h*group+g uses KV head h
        scores = self.scores(q, keys) * self.scale_value  # [T, Nkv, G, S]
        key_pos = ops.arange(s, dtype=ms.int32).reshape(1, s)
        visible = key_pos < context_lens.reshape(t, 1)  # [T, S]
        scores = ops.masked_fill(scores, ops.logical_not(visible).reshape(t, 1, 1, s), NEG_INF)
        out = self.weighted(ops.softmax(scores, -1), values)  # [T, Nkv, G, D]
        # Undefined by the documentation: an empty context, one longer than the table, or a used
        # table entry outside the cache. (CPU softmax of an all -inf row gives 0, not NaN.)
        used = (ops.arange(max_blocks, dtype=ms.int32).reshape(1, max_blocks) * block_size
                < context_lens.reshape(t, 1))
        bad_entry = ops.logical_and(used, ops.logical_or(block_tables < 0, block_tables >= num_blocks))
        bad = ops.logical_or(ops.logical_or(context_lens < 1, context_lens > s), bad_entry.any(1))
        if q_seq_lens is not None:
            bad = ops.logical_or(bad, q_seq_lens != 1)
        out = ops.masked_fill(out, bad.reshape(t, 1, 1, 1), NAN)
        return out.reshape(query.shape).astype(query.dtype)


# --------------------------------------------------------------------------------------------
# FlashAttentionScore(head_num, keep_prob=1.0, scale_value=1.0, pre_tokens=2147483647,
#                     next_tokens=2147483647, inner_precise=0, input_layout='BSH', sparse_mode=0)
#   (query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
#    prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None)
#   -> (softmax_max, softmax_sum, softmax_out, attention_out)
#   y = softmax(mask(scale * q k^T, attn_mask)) v; attn_mask bool/uint8, 1 = discard, shaped
#   (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) for sparse_mode 0/1; D a multiple of 16, <= 512;
#   N2 divides N1 (query head n uses KV head n // (N1 / N2)); fp16/bf16.
#   Implemented here: layouts BSH, BNSD, BSND, SBH; sparse_mode 0 with the default pre/next
#   tokens, and 1; no dropout, pse, prefix or actual_seq lengths.
# --------------------------------------------------------------------------------------------
LAYOUTS = ("BSH", "BNSD", "SBH", "BSND", "TND", "TH")
STANDIN_LAYOUTS = ("BSH", "BNSD", "SBH", "BSND")


def _bnsd_dims(layout, shape, heads):
    """(B, N, S, D) of a tensor in `layout`; heads is N when known (the query), else None."""
    if layout == "BNSD":
        return shape[0], shape[1], shape[2], shape[3]
    if layout == "BSND":
        return shape[0], shape[2], shape[1], shape[3]
    if layout == "BSH":
        b, s, h = shape
    else:  # SBH
        s, b, h = shape
    return b, heads, s, h // heads if heads else None


@constexpr
def _check_flash_attention(head_num, layout, sparse_mode, q_shape, q_dtype, k_shape, k_dtype, v_shape, v_dtype,
                           mask_shape, mask_dtype, extras_none):
    op = "FlashAttentionScore"
    CALLS[op] += 1
    _require(extras_none, op, "the stand-in implements no real_shift / drop_mask / padding_mask / prefix / "
                              "actual_seq_qlen / actual_seq_kvlen")
    _dtype_ok(op, "query", q_dtype, REAL_DTYPES)
    _require(k_dtype == q_dtype and v_dtype == q_dtype, op, f"query/key/value dtypes differ: {q_dtype} {k_dtype} {v_dtype}")
    _require(tuple(k_shape) == tuple(v_shape), op, f"key {k_shape} and value {v_shape} differ")
    rank = 4 if layout in ("BNSD", "BSND") else 3
    _require(len(q_shape) == rank and len(k_shape) == rank, op, f"{layout} needs rank-{rank} query/key, got {q_shape} {k_shape}")
    if layout in ("BSH", "SBH"):
        _require(q_shape[-1] % head_num == 0, op, f"H1 {q_shape[-1]} is not head_num {head_num} x D")
    b, n1, s1, d = _bnsd_dims(layout, q_shape, head_num)
    _require(n1 == head_num, op, f"query has {n1} heads, head_num is {head_num}")
    if layout in ("BSH", "SBH"):
        _require(k_shape[-1] % d == 0, op, f"H2 {k_shape[-1]} is not a multiple of D {d}")
        kb, n2, s2, kd = _bnsd_dims(layout, k_shape, k_shape[-1] // d)
    else:
        kb, n2, s2, kd = _bnsd_dims(layout, k_shape, None)
    _require(kb == b, op, f"query batch {b}, key batch {kb}")
    _require(kd == d, op, f"D-axis of query ({d}) and key ({kd}) differ")
    _require(d % 16 == 0 and d <= 512, op, f"D must be a multiple of 16 and at most 512, got {d}")
    _require(n2 > 0 and n1 % n2 == 0, op, f"N2 {n2} must be a factor of N1 {n1}")
    if mask_shape is not None:
        _require(mask_dtype in MASK_DTYPES, op, f"attn_mask must be bool or uint8 (1 = discard), got {mask_dtype}")
        allowed = ((b, n1, s1, s2), (b, 1, s1, s2), (s1, s2))
        _require(tuple(mask_shape) in allowed, op, f"attn_mask shape {mask_shape} is none of {allowed} "
                                                   f"(sparse_mode {sparse_mode})")
    else:
        _require(sparse_mode == 0, op, f"sparse_mode {sparse_mode} needs an attn_mask")
    return b, n1, s1, d, n2, s2


class FlashAttentionScoreStandIn(nn.Cell):
    def __init__(self, head_num, keep_prob=1.0, scale_value=1.0, pre_tokens=2147483647, next_tokens=2147483647,
                 inner_precise=0, input_layout="BSH", sparse_mode=0):
        super().__init__()
        op = "FlashAttentionScore"
        _require(isinstance(head_num, int) and head_num > 0, op, f"head_num {head_num!r}")
        _require(isinstance(scale_value, float), op, f"scale_value must be a float, got {scale_value!r}")
        _require(input_layout in LAYOUTS, op, f"input_layout {input_layout!r} is not one of {LAYOUTS}")
        _require(input_layout in STANDIN_LAYOUTS, op, f"the stand-in does not implement {input_layout}")
        _require(sparse_mode in (0, 1, 2, 3, 4, 5), op, f"invalid sparse_mode {sparse_mode}")
        _require(sparse_mode in (0, 1), op, "the stand-in implements sparse_mode 0 and 1 only")
        _require(keep_prob == 1.0, op, "the stand-in implements no dropout")
        _require(pre_tokens == 2147483647 and next_tokens == 2147483647, op,
                 "the stand-in implements the default pre_tokens/next_tokens only")
        self.head_num, self.scale_value, self.layout = head_num, scale_value, input_layout
        self.sparse_mode = sparse_mode
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.weighted = ops.BatchMatMul()

    def _to_bnsd(self, x, n, d):
        if self.layout == "BNSD":
            return x
        if self.layout == "BSND":
            return x.transpose(0, 2, 1, 3)
        if self.layout == "SBH":
            x = x.transpose(1, 0, 2)
        b, s, _ = x.shape
        return x.reshape(b, s, n, d).transpose(0, 2, 1, 3)

    def _from_bnsd(self, x):
        b, n, s, d = x.shape
        if self.layout == "BNSD":
            return x
        if self.layout == "BSND":
            return x.transpose(0, 2, 1, 3)
        x = x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
        if self.layout == "SBH":
            return x.transpose(1, 0, 2)
        return x

    def construct(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
                  prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None):
        extras_none = (real_shift is None and drop_mask is None and padding_mask is None and prefix is None
                       and actual_seq_qlen is None and actual_seq_kvlen is None)
        if attn_mask is None:
            dims = _check_flash_attention(self.head_num, self.layout, self.sparse_mode, query.shape, query.dtype,
                                          key.shape, key.dtype, value.shape, value.dtype, None, None, extras_none)
        else:
            dims = _check_flash_attention(self.head_num, self.layout, self.sparse_mode, query.shape, query.dtype,
                                          key.shape, key.dtype, value.shape, value.dtype, attn_mask.shape,
                                          attn_mask.dtype, extras_none)
        b, n1, s1, d, n2, s2 = dims
        group = n1 // n2
        q = self._to_bnsd(query.astype(ms.float32), n1, d).reshape(b, n2, group * s1, d)
        k = self._to_bnsd(key.astype(ms.float32), n2, d)
        v = self._to_bnsd(value.astype(ms.float32), n2, d)
        scores = (self.scores(q, k) * self.scale_value).reshape(b, n2, group, s1, s2)
        dead = None
        if attn_mask is not None:
            if len(attn_mask.shape) == 2:
                discard = attn_mask.reshape(1, 1, 1, s1, s2)
            elif attn_mask.shape[1] == 1:
                discard = attn_mask.reshape(b, 1, 1, s1, s2)
            else:
                discard = attn_mask.reshape(b, n2, group, s1, s2)
            discard = discard.astype(ms.bool_)
            scores = ops.masked_fill(scores, discard, NEG_INF)
            dead = discard.all(-1, keep_dims=True)
        row_max = scores.max(-1, keepdims=True)
        probs = ops.softmax(scores, -1).reshape(b, n2, group * s1, s2)
        out = self.weighted(probs, v).reshape(b, n2, group, s1, d)
        if dead is not None:
            # A query whose keys are all discarded: the result is undefined, so NaN (CPU softmax of
            # an all -inf row would give 0).
            out = ops.masked_fill(out, dead, NAN)
        out = out.reshape(b, n1, s1, d)
        exp_sum = ops.exp(scores - row_max).sum(-1, keepdims=True)
        softmax_max = ops.broadcast_to(row_max.reshape(b, n1, s1, 1), (b, n1, s1, 8))
        softmax_sum = ops.broadcast_to(exp_sum.reshape(b, n1, s1, 1), (b, n1, s1, 8))
        softmax_out = ops.zeros((), query.dtype)
        return softmax_max, softmax_sum, softmax_out, self._from_bnsd(out).astype(query.dtype)


ATTENTION_STANDINS = {"ReshapeAndCache": ReshapeAndCacheStandIn, "PagedAttention": PagedAttentionStandIn,
                      "FlashAttentionScore": FlashAttentionScoreStandIn}
