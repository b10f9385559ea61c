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
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import ops

from scripts import ascend_op_cases as C
from tests.ascend_moe_standins import STANDINS as MOE_STANDINS
from tests.ascend_standins import ATTENTION_STANDINS
from tests.paths import ROOT

STANDINS = dict(MOE_STANDINS, **ATTENTION_STANDINS)
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
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
    ("GroupedMatmul bf16 bias (CANN: fp32 with bf16 x)",
     lambda: _with_args(next(c for c in CASES if c.op == "GroupedMatmul" and c.dtype == "bfloat16" and "bias" in c.name),
                        args={2: _dtype("bfloat16")}), "bias must be a list of one", False),
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


def _call_paged_q_seq_lens(op, t, c):
    return op(t[0], t[1], t[2], t[3], t[4], None, None, None, t[5])


@pytest.mark.parametrize("q_len, ok", [(1, True), (2, False)], ids=["one query each", "two queries"])
def test_paged_attention_takes_q_seq_lens_of_one_query_per_sequence(q_len, ok):
    """vllm-mindspore and mindformers pass q_seq_lens (a graph input of that name) to
    PagedAttention; the stand-in implements one query per sequence and poisons anything else."""
    case = _first("PagedAttention")
    lens = C.Arg(np.full(len(case.args[4].value), q_len, np.int32), "int32")
    result = C.run_case(dataclasses.replace(case, args=case.args + [lens], call=_call_paged_q_seq_lens), STANDINS)
    assert result.ok == ok, result.detail


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


# -- scripts/validate_ascend.py -----------------------------------------------------------------

SCRIPT = os.path.join(ROOT, "scripts", "validate_ascend.py")


def _script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_validate_ascend_without_an_npu_prints_one_line_and_exits_2():
    from scripts.validate_ascend import npu_count
    if npu_count():
        pytest.skip("an NPU is present")
    proc = _script()
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "no Ascend NPU" in proc.stdout, proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


def test_validate_ascend_dry_run_passes():
    """The plan on CPU: one op's cases (every case runs in-process above) and the tiny model end
    to end, ascend backend on the stand-ins in fp16 against the native backend in fp32."""
    proc = _script("--dry-run", "--ops", "MoeComputeExpertTokens", "--dtypes", "float16", "--models", "llama")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert sum(r[:1] == ["op"] and "PASS" in r for r in rows) == 2, proc.stdout
    assert any(r[:3] == ["model", "tiny", "llama"] and "PASS" in r for r in rows), proc.stdout


class CountsNotEnds(STANDINS["MoeComputeExpertTokens"]):
    """A wrong MoeComputeExpertTokens: per-expert counts instead of cumulative ends."""

    def construct(self, sorted_experts, num_expert):
        ends = super().construct(sorted_experts, num_expert)
        return ends - ops.concat((ops.zeros(1, ends.dtype), ends[:-1]))


def test_a_standin_that_misses_its_examples_is_not_installed():
    from tests.ascend_standins import verify
    with pytest.raises(AssertionError, match="does not reproduce .*docstring example"):
        verify({"MoeComputeExpertTokens": CountsNotEnds})


def test_validate_ascend_reports_a_wrong_kernel(monkeypatch, capsys):
    """A wrong kernel fails its rows and the exit status."""
    from scripts import validate_ascend as V
    monkeypatch.setattr(V, "op_kernels", lambda dry_run, ops: dict(STANDINS, MoeComputeExpertTokens=CountsNotEnds))
    assert V.main(["--dry-run", "--ops", "MoeComputeExpertTokens", "--dtypes", "float16", "--models", ""]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2 and "expert_tokens" in out, out


def _generation(tokens, logprobs):
    return {"tokens": tokens, "logprobs": [{str(t): lp for t, lp in step.items()} for step in logprobs]}


def test_generations_compare_tokens_logprobs_and_near_ties():
    from scripts.validate_ascend import compare_generations
    ref = [_generation([5, 9], [{5: -0.1, 7: -2.5}, {9: -0.70, 4: -0.72}])]
    assert compare_generations(ref, [_generation([5, 9], [{5: -0.11}, {9: -0.71}])], 0.03)[0]
    assert not compare_generations(ref, [_generation([5, 9], [{5: -0.2}, {9: -0.70}])], 0.03)[0]  # drift
    parted = compare_generations(ref, [_generation([5, 4], [{5: -0.1}, {4: -0.70}])], 0.03)
    assert parted[0] and "near tie" in parted[1]  # 9 and 4 are 0.02 apart in the reference
    assert not compare_generations(ref, [_generation([7, 9], [{7: -0.1}, {9: -0.7}])], 0.03)[0]  # 2.4 apart
