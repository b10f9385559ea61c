"""The whole Ascend step graph through MindSpore's own checks, on CPU.

Compiling a graph runs every primitive's shape/dtype inference (MindSpore's C++ infer functions,
the vendor's code) before any kernel is selected; on CPU the compile then stops at the first
Ascend-only kernel with "Unsupported op [<Name>] on CPU" (in bf16 often earlier, at the first
CPU kernel without bf16: "Select CPU operator[<Name>] fail! Unsupported data type!"; both are
kernel selection, which comes after the whole graph's inference). So for each model family, in
fp16 and bf16, for a prefill and a decode bucket, the compiled ascend step may fail only that
way: any other error is a call the NPU would refuse too (e.g. GroupedMatmul with transpose_b, or
MoeFinalizeRouting without a bias). Real primitives, no stand-ins; zero weights (inference reads
shapes and dtypes only).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from tests.tiny import TINY_LLAMA
from tests.tiny_minimax import minimax_config

UNSUPPORTED_ON_CPU = re.compile(r"Unsupported op \[\w+\] on CPU|Select CPU operator\[\w+\] fail! Unsupported data type")
BLOCK = 16
CACHE_BLOCKS = 5  # 4 per row, plus the padding block
LLAMA = dict(TINY_LLAMA, architectures=["LlamaForCausalLM"], num_hidden_layers=1)  # one layer: a quicker compile
MINICPM = dict(LLAMA, architectures=["MiniCPMForCausalLM"], scale_emb=2.0, scale_depth=1.4, dim_model_base=16)
FAMILIES = {
    "llama": LLAMA,
    "minicpm4": MINICPM,
    "minicpm4-infllm-v2": dict(MINICPM, sparse_config=dict(window_size=128, topk=2, dense_len=-1)),
    "minimax": minimax_config(hidden=64, heads=2, head_dim=32, kv_heads=1, attn_types=(0, 1), intermediate=32,
                              shared_intermediate=32),
    # weight-only int8 projections: WeightQuantBatchMatmul (mindcpm/ops/ascend_quant.py)
    "llama-int8": dict(LLAMA, quantization_on_load="int8"),
}
# More WeightQuantBatchMatmul calls: groups of 32 (antiquant_group_size > 0) in int8 and int4
# (qint4x2). Decode only: the op's inference does not depend on the number of rows.
QUANT_FAMILIES = {
    "llama-int8-g32": dict(LLAMA, quantization_on_load="int8", group_size_on_load=32),
    "llama-int4-g32": dict(LLAMA, quantization_on_load="int4", group_size_on_load=32),
    # GPTQ act-order: each projection gathers x into its weight's input order first
    "llama-int4-g32-act-order": dict(LLAMA, quantization_on_load="int4", group_size_on_load=32, act_order=True),
}
BUCKETS = {"prefill": (2, 16), "decode": (2, 1)}  # rows, tokens per row
NUM_SPECULATIVE_TOKENS = 4


def step_inputs(device, model, rows: int, width: int, cached: int = 0) -> list:
    """A step's inputs in the device's order: every row a sequence with `cached` tokens in the
    cache computing `width` more. With tokens cached (a verify row: the last token and its k
    drafts) every position's logits are read, as the runner asks for when it verifies."""
    import mindspore as ms
    from mindcpm.layers.sparse import sparse_step_metadata
    nb = CACHE_BLOCKS - 1
    tables = np.arange(rows * nb, dtype=np.int32).reshape(rows, nb) % nb
    positions = np.tile(np.arange(cached, cached + width, dtype=np.int32), (rows, 1))
    slots = np.take_along_axis(tables, positions // BLOCK, axis=1) * BLOCK + positions % BLOCK
    last_rows = np.arange(rows, dtype=np.int32) * width + width - 1
    meta = {"input_ids": np.ones((rows, width), np.int32), "positions": positions,
            "batch_valid_length": np.full(rows, cached + width, np.int32),
            "q_seq_lens": np.full(rows, width, np.int32), "slot_mapping": slots.reshape(-1).astype(np.int32),
            "block_tables": tables, "logits_rows": np.arange(rows * width, dtype=np.int32) if cached else last_rows,
            "state_slots": np.arange(rows, dtype=np.int32)}
    if device.sparse is not None:
        seqs = [SimpleNamespace(num_cached_tokens=0)] * rows
        meta.update(sparse_step_metadata(seqs, [width] * rows, tables, width, nb))
    return [ms.Tensor(meta[name]) for name in device.step_input_names(model)]


def build(config: dict, dtype_name: str, tmp_path):
    """(device, model, compiled step factory) of an ascend device in `dtype_name`."""
    import mindspore as ms
    from mindcpm.config import ModelConfig
    from mindcpm.engine.runner import _CompiledStep
    from mindcpm.models.registry import model_class
    from mindcpm.ops import Device
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(config, f)
    cfg = ModelConfig.from_dir(str(tmp_path))
    device = Device("ascend", getattr(ms, dtype_name), sparse=cfg.sparse, block_size=BLOCK, cache_blocks=CACHE_BLOCKS,
                    quantization=config.get("quantization_on_load"), quant_group_size=config.get("group_size_on_load"))
    extra = {"num_state_slots": 3} if cfg.minimax is not None else {}
    model = model_class(cfg.architecture)(cfg, device, **extra)
    if config.get("act_order"):
        reverse_input_orders(model, device)
    device.after_load(model)
    return device, model, lambda shapes: _CompiledStep(model, shapes, device.jit_options())


def reverse_input_orders(model, device) -> None:
    """Every projection's weight as an act-order one reading its inputs in reverse."""
    import dataclasses
    for _, cell in model.cells_and_names():
        if getattr(cell, "input_perm", False) is None:
            n, k = cell.quant.shape
            qw = device.quantize(np.zeros((n, k), np.float32))
            cell.quant.load_quantized(dataclasses.replace(qw, input_perm=np.arange(k)[::-1].copy()))


@pytest.mark.parametrize("bucket", list(BUCKETS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ascend_step_passes_mindspore_inference(family, dtype, bucket, tmp_path, monkeypatch):
    check_ascend_step(family, dtype, tmp_path, monkeypatch, *BUCKETS[bucket])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", list(QUANT_FAMILIES))
def test_quantized_ascend_step_passes_mindspore_inference(family, dtype, tmp_path, monkeypatch):
    check_ascend_step(family, dtype, tmp_path, monkeypatch, *BUCKETS["decode"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ascend_verify_step_passes_mindspore_inference(dtype, tmp_path, monkeypatch):
    """The step that verifies draft chains (speculative decoding): decode rows of the last token
    and its k drafts, 1 + k query tokens each over a cache that already holds 11, every
    position's logits out."""
    check_ascend_step("minicpm4", dtype, tmp_path, monkeypatch, 2, 1 + NUM_SPECULATIVE_TOKENS, cached=11)


def check_ascend_step(family, dtype, tmp_path, monkeypatch, rows, width, cached=0):
    """Compiles the ascend step on CPU: it may end only at kernel selection (UNSUPPORTED_ON_CPU)."""
    from mindcpm.ops import setup_runtime
    setup_runtime("cpu")
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "0")  # a cached graph would skip the inference
    config = {**FAMILIES, **QUANT_FAMILIES}[family]
    device, model, compiled = build(config, dtype, tmp_path)
    quantization = config.get("quantization_on_load")
    if quantization:  # the projections hold WeightQuantBatchMatmul's weights, int4 as qint4x2
        import mindspore as ms
        weights = {p.dtype for name, p in model.parameters_and_names() if name.endswith("weight_packed")}
        assert weights == {ms.qint4x2 if quantization == "int4" else ms.int8}, weights
    gathers = [name for name, cell in model.cells_and_names() if getattr(cell, "input_perm", None) is not None]
    assert len(gathers) == (4 if config.get("act_order") else 0), gathers  # q|k|v, o, gate|up, down
    inputs = step_inputs(device, model, rows, width, cached)
    try:
        compiled(tuple(t.shape for t in inputs))(*inputs)
    except (RuntimeError, TypeError) as e:  # MindSpore raises kernel selection failures as either
        message = str(e)
        assert UNSUPPORTED_ON_CPU.search(message), message[:2000]
        return
    # Only the sparse family has no Ascend-only op (InfLLM-v2 is a composite on every device).
    assert device.attention_name == "infllm-v2" and family != "minimax"


GRAPH_INPUTS_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from tests.ops.test_ascend_vendor_checks import FAMILIES, build, step_inputs
    from mindcpm.ops import setup_runtime
    setup_runtime("cpu")
    device, model, compiled = build(FAMILIES["minimax"], "float16", {tmp!r})
    inputs = step_inputs(device, model, 2, 1)
    step = compiled(tuple(t.shape for t in inputs))
    try:
        step(*inputs)
    except RuntimeError:
        pass
    print(json.dumps(step.jit_config_dict))
""")


def test_compiled_ascend_step_names_its_inputs_and_boosts_inference(tmp_path):
    """Read off the compiled graph (MindSpore's own IR dump, in a fresh process): the internal
    PagedAttention finds the host inputs `batch_valid_length` and `q_seq_lens` by name, and the
    step is compiled with infer_boost on (which selects those internal kernels)."""
    from tests.paths import ROOT as root
    dump = tmp_path / "ir"
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=str(dump), MS_COMPILER_CACHE_ENABLE="0")
    script = GRAPH_INPUTS_SCRIPT.format(root=root, tmp=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                         cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    jit_config = json.loads(run.stdout.strip().splitlines()[-1])
    assert jit_config["infer_boost"] == "on" and jit_config["jit_level"] == "O0"
    validated = sorted(dump.rglob("*validate*.ir"))
    assert validated, "no IR dumped"
    names = re.findall(r"^%para\d+_(\w+):", validated[0].read_text(), re.M)
    assert names[:8] == ["input_ids", "positions", "batch_valid_length", "q_seq_lens", "slot_mapping",
                         "block_tables", "logits_rows", "extra0"], names[:10]


def test_device_detection_is_quiet_and_an_ascend_setup_failure_is_one_error(tmp_path):
    """On this CPU host: the device count says "cpu" with no plugin-loading warnings (a plain
    LLM() used to print four), and forcing Ascend is one RuntimeError line, not silence."""
    script = textwrap.dedent("""
        from mindcpm.ops.device import detect_device, setup_runtime
        print(detect_device())
        try:
            setup_runtime("ascend")
        except RuntimeError as e:
            print("error:", e)
    """)
    from tests.paths import ROOT as root
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    out = run.stdout.strip().splitlines()
    if out and out[0] == "ascend":
        pytest.skip("an Ascend device is present")
    assert out[0] == "cpu" and "Load dynamic library" not in run.stderr, run.stderr[-2000:]
    assert len(out) == 2 and out[1].startswith("error: cannot use the Ascend device: "), out
