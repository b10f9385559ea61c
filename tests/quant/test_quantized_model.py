"""A whole model quantized on load (LLM(quantization="int8" | "int4")) against transformers in
fp32 running the DEQUANTIZED weights: the codes and scales the model holds are decoded here with
numpy straight from the packing layout (mindcpm/quant/formats.py's docstring), written into a
checkpoint, and transformers reads it. What is left is the kernel's fp32 accumulation order, so
the tolerance is the fp32 one of the float kernel tests, not a quantization error."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from safetensors.numpy import load_file, save_file  # noqa: E402

from tests.engine_probe import prefill_logits  # noqa: E402
from tests.quant.test_formats import pack_int32_here  # noqa: E402
from tests.quant.rounding import HF_PARTS, quantized_projections  # noqa: E402
from tests.reference.hf_llama import reference_logits, reference_logits_each  # noqa: E402
from tests.tiny import make_llm, make_tiny_model  # noqa: E402

PROMPTS = [[256, 5, 9, 33, 7], list(range(2, 40)), [256] + list(range(100, 117))]
KERNELS_ON = dict(kernels="on", enable_prefix_caching=False)  # the quantized kernels, every prompt computed
# (method, group size): int8 per output channel, int4 in groups of 32 of the tiny model's 64 / 128 inputs
# fused: each decoder layer as the quantized kernels' block ops (Device.fuse_blocks), or layer by layer
STEPS = 4  # greedy tokens compared
METHODS = [("int8", None, True), ("int4", 32, True), ("int8", 64, True), ("int4", 32, False)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from mindcpm.ops.cpu_kernels import kernels_available
    if not kernels_available():
        pytest.skip("no g++ to build the CPU kernels")
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_quant")))


def decode_numpy(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """Symmetric codes of a weight with k inputs -> fp32: 8-bit one code a byte; 4-bit blocks of
    32 inputs in 16 bytes, byte j = c[j] | c[j + 16] << 4; w = s * (c - 2^(bits-1)) per group."""
    n, bits = packed.shape[0], packed.shape[1] * 8 // k
    if bits == 8:
        codes = packed.astype(np.float32)
    else:
        blocks = packed.reshape(n, -1, 16)
        codes = np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(n, k).astype(np.float32)
    return scales.astype(np.float32).repeat(k // scales.shape[1], axis=1) * (codes - (1 << (bits - 1)))


def dequantized_checkpoint(llm, src: str, out: str) -> None:
    """src's checkpoint with every quantized projection replaced by what its codes stand for."""
    os.makedirs(out)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), out)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for name, cell in llm.engine.runner.model.cells_and_names():
        if not getattr(cell, "quantized", False):
            continue
        w = decode_numpy(cell.weight_packed.asnumpy(), cell.weight_scales.asnumpy(), cell.in_features)
        if name == "lm_head":  # quantized too (int8 / int4 on load)
            assert not np.array_equal(tensors["lm_head.weight"], w), "lm_head not quantized"
            tensors["lm_head.weight"] = w
            continue
        parent, proj = name.rsplit(".", 1)
        for part, hf_proj in enumerate(HF_PARTS.get(proj, (proj,))):
            hf_name = f"model.{parent}.{hf_proj}.weight"
            assert tensors[hf_name].shape == w[cell.part_rows(part)].shape, hf_name
            assert not np.array_equal(tensors[hf_name], w[cell.part_rows(part)]), f"{hf_name} not quantized"
            tensors[hf_name] = np.ascontiguousarray(w[cell.part_rows(part)])
    save_file(tensors, os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("method,group,fused", METHODS)
def test_quantized_logits_match_transformers_on_dequantized_weights(tiny_dir, tmp_path, monkeypatch, fp32_gemm,
                                                                   method, group, fused):
    from mindcpm import SamplingParams
    from mindcpm.ops.device import Device
    if not fused:
        monkeypatch.setattr(Device, "fuse_blocks", lambda self, model: None)
    llm = make_llm(tiny_dir, **KERNELS_ON, quantization=method, quant_group_size=group)
    layers = llm.engine.runner.model.layers
    layer_type = type(layers[0]).__name__
    assert (layer_type == "KernelQuantDecoderLayer") == fused, layer_type
    if fused:  # every layer but the last returns before its work is done; the next one waits
        assert [layer.returns_early for layer in layers] == [True] * (len(layers) - 1) + [False]
    qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert qkv.quantized and qkv.weight_packed.dtype == ms.uint8
    bits = 8 if method == "int8" else 4
    assert qkv.weight_packed.shape[1] == qkv.in_features * bits // 8
    assert qkv.weight_scales.shape[1] == qkv.in_features // (group or qkv.in_features)
    ref_dir = str(tmp_path / "dequantized")
    dequantized_checkpoint(llm, tiny_dir, ref_dir)
    ((ref, ref_tokens),) = reference_logits_each([ref_dir], PROMPTS, str(tmp_path), STEPS)
    for ours, theirs in zip(prefill_logits(llm, PROMPTS), ref):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # Greedy decode in compiled steps: the LM head returns before its work is done, the kernel's
    # arg-max is queued behind it, and the step waits for both before its ids are read.
    assert llm.engine.runner.model.lm_head.matmul.returns_early
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens
    assert any(shapes[0][1] == 1 for shapes in llm.engine.runner.compiled_shapes), "no compiled decode step"


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32)])
def test_int16_activations_cost_less_than_fp16_activations(tiny_dir, tmp_path, method, group):
    """By default the SIMD kernels multiply 8- and 4-bit codes by x rounded to int16 per 32 inputs,
    in prefill as in decode. The issue's W8A16 / W4A16 allows fp16 activations: against
    transformers on the dequantized weights, the prompt logits must move less than rounding each
    quantized projection's input to fp16 moves transformers' own (and do move: int16 is in use)."""
    from mindcpm.quant.linear import gemm_activations, kernel_isa
    if kernel_isa() == "scalar":
        pytest.skip("the scalar path keeps x fp32")
    llm = make_llm(tiny_dir, **KERNELS_ON, quantization=method, quant_group_size=group)
    assert gemm_activations() == "int16"
    ref_dir = str(tmp_path / "dequantized")
    dequantized_checkpoint(llm, tiny_dir, ref_dir)
    (exact, _), (a16, _) = reference_logits_each([ref_dir, ref_dir], PROMPTS, str(tmp_path),
                                                 fp16_inputs=[None, quantized_projections(llm)])
    for ours, want, fp16 in zip(prefill_logits(llm, PROMPTS), exact, a16):
        error, fp16_error = np.abs(ours - want).max(), np.abs(fp16 - want).max()
        assert 1e-6 < error <= fp16_error, (error, fp16_error)


BAD = {
    ("--quantization", "int3"): ["unknown quantization 'int3'", "int8, int4, bitcpm"],
    # int4's default groups of 128 inputs do not divide the tiny model's hidden size of 64
    ("--quantization", "int4"): ["group size 128 does not divide the input dimension 64"],
    ("--quantization", "int4", "--quant-group-size", "48"): ["group size 48 does not divide"],
    ("--quantization", "int8", "--kernels", "off"): ["runs on the CPU kernels, which are off"],
}


@pytest.mark.parametrize("args", list(BAD))
def test_bad_quantization_is_one_error_line(tiny_dir, args, capsys):
    from tests.test_cli import assert_one_error_line, generate
    status = generate.main(["--model", tiny_dir, *args, "x"])
    captured = capsys.readouterr()
    assert status != 0 and captured.out == "", (captured.out, captured.err)
    assert_one_error_line(captured.err, *BAD[args])



# -- GPTQ checkpoints, written here with numpy from the format (quant/gptq.py's docstring) ------------
def unpack_int32_here(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> their 32 / bits codes along `axis`, code j of a word at bits j * bits."""
    w = np.moveaxis(words.view(np.uint32), axis, 0)
    per = 32 // bits
    codes = np.stack([(w >> np.uint32(bits * j)) & np.uint32((1 << bits) - 1) for j in range(per)], 1)
    return np.moveaxis(codes.reshape((-1,) + w.shape[1:]).astype(np.int64), 0, axis)


def gptq_pack(w: np.ndarray, config: dict, order: np.ndarray | None) -> dict:
    """A float weight [N, K] -> GPTQ qweight / qzeros / scales / g_idx. order (act-order): the
    inputs in the order GPTQ quantized them, its j-th input in group j // G, so g_idx[order[j]] = j // G."""
    bits, group, n, k = config["bits"], config["group_size"], *w.shape
    top, center = (1 << bits) - 1, 1 << (bits - 1)
    g_idx = np.arange(k) // group
    if order is not None:
        g_idx[order] = np.arange(k) // group
    lo = np.stack([w[:, g_idx == g].min(1) for g in range(k // group)])  # [groups, N]
    hi = np.stack([w[:, g_idx == g].max(1) for g in range(k // group)])
    if config["sym"]:
        scales = (np.maximum(-lo, hi) / (center - 1)).astype(np.float16)
        zeros = np.full(scales.shape, center)
    else:
        scales = ((hi - lo) / top).astype(np.float16)
        zeros = np.clip(np.round(-lo / scales.astype(np.float32)), 0, top).astype(np.int64)
    s = scales.astype(np.float32)[g_idx]  # [K, N]
    q = np.clip(np.round(w.T / s) + zeros[g_idx], 0, top)
    stored = (zeros - 1) % (1 << bits) if config.get("checkpoint_format", "gptq") == "gptq" else zeros
    fields = {"qweight": pack_int32_here(q, bits, 0), "qzeros": pack_int32_here(stored, bits, 1), "scales": scales,
              "g_idx": g_idx.astype(np.int32)}
    return {name: np.ascontiguousarray(v) for name, v in fields.items()}  # as safetensors writes them


def gptq_dequantize(t: dict, config: dict, honour_g_idx: bool = True) -> np.ndarray:
    """The fp32 weight [N, K] GPTQ tensors stand for: w[n, k] = scale[g, n] (q[k, n] - zero[g, n]),
    g = g_idx[k] (k // G when not honour_g_idx: what a loader ignoring act-order would compute)."""
    bits = config["bits"]
    q, zeros = unpack_int32_here(t["qweight"], bits, 0), unpack_int32_here(t["qzeros"], bits, 1)
    if config.get("checkpoint_format", "gptq") == "gptq":
        zeros = (zeros + 1) % (1 << bits)
    k = q.shape[0]
    g = t["g_idx"] if honour_g_idx else np.arange(k) // (k // t["scales"].shape[0])
    w = t["scales"].astype(np.float32)[g] * (q - zeros[g, :q.shape[1]]).astype(np.float32)
    return np.ascontiguousarray(w.T)  # safetensors writes an array's memory as it lies


def input_orders(tensors: dict, seed: int) -> dict:
    """Act-order: a random order of each projection's inputs, shared by the projections that read
    the same input (q/k/v, gate/up), as GPTQ orders them by that input's statistics."""
    rng, orders = np.random.default_rng(seed), {}
    for name, w in sorted(tensors.items()):
        if name.endswith("_proj.weight"):
            reads = name.rsplit(".", 2)[0] + {"o_proj": ".o", "down_proj": ".down"}.get(name.split(".")[-2], ".in")
            orders[name] = orders.setdefault(reads, rng.permutation(w.shape[1]))
    return orders


def write_gptq(src: str, out: str, quantization_config: dict, ref: str, ignored_g_idx: str | None = None) -> None:
    """src as a GPTQ checkpoint under `out` (act-order when desc_act), and the weights its
    tensors stand for (fp32) under `ref`; under ignored_g_idx, those read with g_idx ignored."""
    config = json.load(open(os.path.join(src, "config.json")))
    refs = [d for d in (ref, ignored_g_idx) if d]
    for d in (out, *refs):
        os.makedirs(d)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(src, name), d)
    for d in refs:
        json.dump(config, open(os.path.join(d, "config.json"), "w"))
    json.dump(dict(config, quantization_config=quantization_config), open(os.path.join(out, "config.json"), "w"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    orders = input_orders(tensors, 7) if quantization_config["desc_act"] else {}
    packed, dequantized = {}, [dict(tensors) for _ in refs]
    for name, w in tensors.items():
        if not name.endswith("_proj.weight"):
            packed[name] = w
            continue
        fields = gptq_pack(w, quantization_config, orders.get(name))
        packed.update({f"{name[:-len('weight')]}{f}": v for f, v in fields.items()})
        for d, honour in zip(dequantized, (True, False)):
            d[name] = gptq_dequantize(fields, quantization_config, honour)
        # packer and unpacker agree: w back within half a step, or a step and a bit where an
        # asymmetric group's extreme is clipped (its scale rounded down to fp16)
        step = fields["scales"].astype(np.float32)[fields["g_idx"]].T
        assert np.all(np.abs(dequantized[0][name] - w) <= (0.51 if quantization_config["sym"] else 1.2) * step), name
    save_file(packed, os.path.join(out, "model.safetensors"))
    for d, values in zip(refs, dequantized):
        save_file(values, os.path.join(d, "model.safetensors"))


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}
# act-order: 4-bit symmetric in the original ("gptq") format; 8-bit asymmetric in gptq_v2
ACT_ORDER = {"int4-sym": dict(GPTQ, desc_act=True),
             "int8-asym": dict(GPTQ, desc_act=True, bits=8, sym=False, checkpoint_format="gptq_v2")}


def test_gptq_checkpoint_matches_transformers_on_dequantized_weights(tiny_dir, tmp_path, fp32_gemm):
    out, ref_dir = str(tmp_path / "gptq"), str(tmp_path / "ref")
    write_gptq(tiny_dir, out, GPTQ, ref_dir)
    llm = make_llm(out, **KERNELS_ON)
    assert llm.quantization == "gptq"
    assert type(llm.engine.runner.model.layers[0]).__name__ == "KernelQuantDecoderLayer"
    ref, _ = reference_logits(ref_dir, PROMPTS, str(tmp_path))
    for ours, theirs in zip(prefill_logits(llm, PROMPTS), ref):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(ACT_ORDER))
def test_gptq_act_order_matches_transformers_on_dequantized_weights(tiny_dir, tmp_path, fp32_gemm, variant):
    """desc_act: each projection's g_idx a shuffled assignment of its inputs to groups. The model
    gathers x into each weight's group order; its layers run the separate ops. Against the
    weights dequantized honouring g_idx, and (sensitivity) not like those read with it ignored."""
    from mindcpm import SamplingParams
    out, ref_dir, ignored = (str(tmp_path / d) for d in ("gptq", "ref", "ignored"))
    write_gptq(tiny_dir, out, ACT_ORDER[variant], ref_dir, ignored)
    llm = make_llm(out, **KERNELS_ON)
    assert llm.quantization == "gptq"
    layer = llm.engine.runner.model.layers[0]
    assert type(layer).__name__ != "KernelQuantDecoderLayer"
    assert layer.self_attn.qkv_proj.input_perm is not None and layer.mlp.down_proj.input_perm is not None
    (ref, ref_tokens), (wrong, _) = reference_logits_each([ref_dir, ignored], PROMPTS, str(tmp_path), STEPS)
    for ours, theirs, other in zip(prefill_logits(llm, PROMPTS), ref, wrong):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
        assert np.abs(ours - other).max() > 100 * 1e-4
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens


def broken_g_idx(tensors: dict) -> dict:
    """Ways to break the act-order checkpoint's g_idx (tensor names without "model.layers.0.")."""
    def set_value(name, index, value):
        tensors[name][index] = value
    q, k = "model.layers.0.self_attn.q_proj.g_idx", "model.layers.0.self_attn.k_proj.g_idx"
    return {
        "out of range": (lambda: set_value(q, 3, 2), [f"{q[6:]} puts input 3 in group 2; the scales have groups 0..1"]),
        "negative": (lambda: set_value(q, 0, -1), ["q_proj.g_idx puts input 0 in group -1"]),
        "too short": (lambda: tensors.update({q: tensors[q][:-1]}), ["q_proj.g_idx is int32 [63], not one integer"]),
        "uneven": (lambda: set_value(q, np.flatnonzero(tensors[q] == 1)[0], 0), ["q_proj.g_idx gives group 0 33 inputs"]),
        "q and k differ": (lambda: tensors.update({k: np.ascontiguousarray(tensors[k][::-1])}),
                           ["qkv_proj.weight: the parts to fuse read their inputs in different act-order"]),
    }


@pytest.mark.parametrize("case", ["out of range", "negative", "too short", "uneven", "q and k differ"])
def test_bad_g_idx_is_one_error_line_naming_the_tensor(tiny_dir, tmp_path, capsys, case):
    from tests.test_cli import assert_one_error_line, generate
    out = str(tmp_path / "gptq")
    write_gptq(tiny_dir, out, ACT_ORDER["int4-sym"], str(tmp_path / "ref"))
    file = os.path.join(out, "model.safetensors")
    tensors = load_file(file)
    spoil, needles = broken_g_idx(tensors)[case]
    spoil()
    save_file(tensors, file)
    status = generate.main(["--model", out, "x"])
    captured = capsys.readouterr()
    assert status != 0 and captured.out == "", (captured.out, captured.err)
    assert_one_error_line(captured.err, *needles)


@pytest.mark.parametrize("change,needles", [
    ({"desc_act": False}, ["g_idx reorders the inputs but desc_act is false"]),
    ({"bits": 3}, ["GPTQ bits=3 is not supported"]),
])
def test_unsupported_gptq_variant_is_one_error_line(tiny_dir, tmp_path, capsys, change, needles):
    from tests.test_cli import assert_one_error_line, generate
    out = str(tmp_path / "gptq")
    write_gptq(tiny_dir, out, ACT_ORDER["int4-sym"], str(tmp_path / "ref"))
    config = json.load(open(os.path.join(out, "config.json")))
    config["quantization_config"].update(change)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    status = generate.main(["--model", out, "x"])
    captured = capsys.readouterr()
    assert status != 0 and captured.out == "", (captured.out, captured.err)
    assert_one_error_line(captured.err, *needles)


# -- BitCPM: ternary weights ({-s, 0, +s} per group) in an ordinary checkpoint ------------------------
def write_ternary(src: str, out: str, spoil: str | None = None) -> None:
    """src with every projection made ternary per group of 32 inputs (s = the group's mean |w|);
    `spoil`: one projection left as it was (not ternary)."""
    shutil.copytree(src, out)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for name, w in tensors.items():
        if name.endswith("_proj.weight") and name != spoil:
            g = w.reshape(w.shape[0], -1, 32)
            s = np.abs(g).mean(-1, keepdims=True)
            tensors[name] = (s * np.sign(g) * (np.abs(g) > s / 2)).reshape(w.shape).astype(np.float32)
    save_file(tensors, os.path.join(out, "model.safetensors"))


def test_bitcpm_ternary_checkpoint_matches_transformers(tiny_dir, tmp_path, caplog):
    """Unasked: the ternary checkpoint is detected (one notice) and runs packed."""
    out = str(tmp_path / "ternary")
    write_ternary(tiny_dir, out)
    with caplog.at_level("WARNING", "mindcpm"):
        llm = make_llm(out, **KERNELS_ON)
    assert llm.quantization == "bitcpm"
    (notice,) = [r.getMessage() for r in caplog.records if "ternary" in r.getMessage()]
    assert "layers.0.self_attn.q_proj.weight is ternary in groups of 32" in notice, notice
    gate_up = llm.engine.runner.model.layers[0].mlp.gate_up_proj
    assert gate_up.weight_packed.shape[1] * 4 == gate_up.in_features  # 2 bits a weight, losslessly
    ref, _ = reference_logits(out, PROMPTS, str(tmp_path))
    for ours, theirs in zip(prefill_logits(llm, PROMPTS), ref):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_non_ternary_checkpoint_names_the_tensor(tiny_dir, tmp_path, capsys):
    """Unasked: layer 0's q_proj is ternary, so the checkpoint is taken for BitCPM, and a later
    projection that is not stops the load (quantization='bitcpm' asked is the same load)."""
    from tests.test_cli import assert_one_error_line, generate
    out = str(tmp_path / "ternary")
    write_ternary(tiny_dir, out, spoil="model.layers.1.self_attn.o_proj.weight")
    status = generate.main(["--model", out, "x"])
    captured = capsys.readouterr()
    assert status != 0 and captured.out == "", (captured.out, captured.err)
    assert_one_error_line(captured.err, "layers.1.self_attn.o_proj.weight is not ternary")
