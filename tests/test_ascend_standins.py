"""The CPU stand-ins of the Ascend kernels, checked before any model-level test trusts them.

1. Each stand-in reproduces the worked examples of its op's MindSpore docstring and the numpy
   goldens of MindSpore's own Ascend tests of the op (scripts/ascend_op_cases.py: the same cases
   scripts/validate_ascend.py runs on an NPU), in fp16 and bf16.
2. MindSpore's own shape/dtype inference of the real primitive accepts every case's call: on CPU
   the compile stops only at "Unsupported op [...] on CPU".
3. The stand-ins refuse what the real ops refuse; where MindSpore's inference refuses it too,
   the test shows that as well.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scripts import ascend_op_cases as C
from tests.ascend_moe_standins import STANDINS as MOE_STANDINS
from tests.ascend_standins import FlashAttentionScoreStandIn, PagedAttentionStandIn, ReshapeAndCacheStandIn

STANDINS = dict(MOE_STANDINS, ReshapeAndCache=ReshapeAndCacheStandIn, PagedAttention=PagedAttentionStandIn,
                FlashAttentionScore=FlashAttentionScoreStandIn)
CASES = C.all_cases()
UNSUPPORTED_ON_CPU = r"Unsupported op \[\w+\] on CPU"


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "0")


def _on_cpu() -> bool:
    import mindspore as ms
    return ms.get_context("device_target") == "CPU"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_standin_reproduces_example_and_golden(case):
    if not case.cpu:
        pytest.skip(case.why)
    result = C.run_case(case, STANDINS)
    assert result.ok, f"{case.label} ({case.source}): {result.detail}"


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == "float16"], ids=lambda c: c.label)
def test_mindspore_inference_accepts_the_case(case):
    """The cases are calls the real primitive takes (so validate_ascend.py's calls are too)."""
    if not _on_cpu():
        pytest.skip("the kernels exist here; validate_ascend.py runs the cases")
    with pytest.raises(RuntimeError, match=UNSUPPORTED_ON_CPU):
        C.run_case(case, C.real_kernels())


# -- refusals -----------------------------------------------------------------------------------

def _first(op, dtype="float16"):
    return next(c for c in CASES if c.op == op and c.dtype == dtype)


def _with_args(case, **changes):
    """The case with args changed: {index: Arg or callable(Arg) -> Arg}, or attrs=/call=."""
    args = list(case.args)
    for key, change in changes.get("args", {}).items():
        args[key] = change(args[key]) if callable(change) else change
    return dataclasses.replace(case, args=args, **{k: v for k, v in changes.items() if k != "args"})


def _dtype(dtype):
    return lambda a: dataclasses.replace(a, dtype=dtype)


def _floats_to(case, dtype):
    return _with_args(case, args={i: _dtype(dtype) for i, a in enumerate(case.args)
                                  if a.dtype in ("float16", "bfloat16")})


def _docstring_key_layout():
    """ReshapeAndCache's docstring passes key as (num_tokens, num_head, head_dim); the op counts
    prod(key.shape[:-1]) tokens, so that call is refused (MindSpore's test passes (b, s, h*d))."""
    case = next(c for c in CASES if c.op == "ReshapeAndCache" and c.name.startswith("key only"))
    heads, head_dim = case.args[1].value.shape[2:]
    key = case.args[0].value.reshape(-1, heads, head_dim)
    return _with_args(case, args={0: lambda a: dataclasses.replace(a, value=key)})


def _paged_block_8():
    return C.paged_attention_case("float16", 4, 2, 32, 8, [3, 9], "block 8", 5)


def _additive_mask():
    case = _first("FlashAttentionScore")
    return _with_args(case, args={3: lambda a: C.Arg(a.value * -10000.0, "float16")})


def _transposed_weight():
    case = _first("GroupedMatmul")
    weight = case.args[1].value.transpose(0, 2, 1)
    return _with_args(case, attrs=dict(case.attrs, transpose_b=True),
                      args={1: lambda a: dataclasses.replace(a, value=weight)})


def _call_finalize_no_bias(op, t, c):
    return op(t[0], t[1], None, None, t[2], t[3], t[4])


def _finalize_without_bias():
    case = _first("MoeFinalizeRouting")
    return dataclasses.replace(case, args=case.args[:2] + case.args[3:], call=_call_finalize_no_bias)


# (what is refused, the refused call, the stand-in's message, MindSpore's inference refuses it too)
REFUSALS = [
    ("ReshapeAndCache fp32", lambda: _floats_to(_first("ReshapeAndCache"), "float32"), "key must be one of", True),
    ("ReshapeAndCache int64 slots", lambda: _with_args(_first("ReshapeAndCache"), args={4: _dtype("int64")}),
     "slot_mapping must be int32", False),
    ("ReshapeAndCache docstring key (T, N, D)", _docstring_key_layout, "num_tokens of slot mapping and key", True),
    ("PagedAttention fp32", lambda: _floats_to(_first("PagedAttention"), "float32"), "query must be one of", True),
    ("PagedAttention int64 context_lens", lambda: _with_args(_first("PagedAttention"), args={4: _dtype("int64")}),
     "context_lens must be int32", False),
    ("PagedAttention int64 block_tables", lambda: _with_args(_first("PagedAttention"), args={3: _dtype("int64")}),
     "block_tables must be int32", False),
    ("PagedAttention block_size 8", _paged_block_8, "block_size 8 is not one of", False),
    ("FlashAttentionScore fp32", lambda: _floats_to(_first("FlashAttentionScore"), "float32"), "query must be one of",
     False),
    ("FlashAttentionScore additive fp16 mask", _additive_mask, "attn_mask must be bool or uint8", False),
    ("GroupedMatmul transpose_b", _transposed_weight, "transpose_a and transpose_b must both be False", True),
    ("GroupedMatmul int32 group_list", lambda: _with_args(_first("GroupedMatmul"), args={2: _dtype("int32")}),
     "group_list must be int64", False),
    ("MoeFinalizeRouting without bias", _finalize_without_bias, "bias is a required", True),
    ("MoeComputeExpertTokens int64", lambda: _with_args(_first("MoeComputeExpertTokens"), args={0: _dtype("int64")}),
     "sorted_experts must be 1D int32", True),
    ("MoeInitRouting int64 expert_idx", lambda: _with_args(_first("MoeInitRouting"), args={2: _dtype("int64")}),
     "row_idx/expert_idx must be int32", False),
]


@pytest.mark.parametrize("what, make, message, vendor_refuses", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_standin_refuses_what_the_op_refuses(what, make, message, vendor_refuses):
    case = make()
    with pytest.raises(AssertionError, match=message):
        C.run_case(case, STANDINS)
    if vendor_refuses and _on_cpu():
        with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
            C.run_case(case, C.real_kernels())
        assert "Unsupported op" not in str(info.value), f"MindSpore's inference accepted {what}"


def test_a_wrong_kernel_fails_the_goldens():
    """The goldens see a plausible mistake: KV heads shared round-robin (head h reads KV head
    h % kv_heads) instead of in groups (h // (heads / kv_heads))."""
    case = _first("PagedAttention")  # GQA 4:2: the rules differ for heads 1 and 2
    order = [0, 2, 1, 3]  # the wrong kernel = the right one with heads 1 and 2 exchanged around it
    swapped = case.args[0].value[:, order]
    wrong = _with_args(case, args={0: lambda a: dataclasses.replace(a, value=swapped)},
                       read=lambda result, t: (result.asnumpy()[:, order],))
    assert C.run_case(case, STANDINS).ok
    result = C.run_case(wrong, STANDINS)
    assert not result.ok, result.detail


def test_cases_cover_every_op_and_both_16bit_dtypes():
    for op in C.BUILDERS:
        dtypes = {c.dtype for c in CASES if c.op == op}
        assert dtypes == ({"float16"} if op == "MoeComputeExpertTokens" else {"float16", "bfloat16"}), (op, dtypes)
    documented = {c.op for c in CASES if c.source.startswith("docstring")}
    assert documented == {"MoeGatingTopKSoftmax", "MoeComputeExpertTokens", "GroupedMatmul", "MoeFinalizeRouting"}
