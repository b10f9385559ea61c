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
from tests.reference.hf_llama import reference_logits  # noqa: E402
from tests.tiny import make_llm, make_tiny_model  # noqa: E402

PROMPTS = [[256, 5, 9, 33, 7], list(range(2, 40)), [256] + list(range(100, 117))]
KERNELS_ON = dict(kernels="on", enable_prefix_caching=False)  # the quantized kernels, every prompt computed
# (method, group size): int8 per output channel, int4 in groups of 32 of the tiny model's 64 / 128 inputs
# fused: each decoder layer as the quantized kernels' block ops (Device.fuse_blocks), or layer by layer
METHODS = [("int8", None, True), ("int4", 32, True), ("int8", 64, True), ("int4", 32, False)]
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


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
        for part, hf_proj in enumerate(FUSED.get(proj, (proj,))):
            hf_name = f"model.{parent}.{hf_proj}.weight"
            assert tensors[hf_name].shape == w[cell.part_rows(part)].shape, hf_name
            assert not np.array_equal(tensors[hf_name], w[cell.part_rows(part)]), f"{hf_name} not quantized"
            tensors[hf_name] = np.ascontiguousarray(w[cell.part_rows(part)])
    save_file(tensors, os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("method,group,fused", METHODS)
def test_quantized_logits_match_transformers_on_dequantized_weights(tiny_dir, tmp_path, monkeypatch, method, group,
                                                                   fused):
    from mindcpm.ops.device import Device
    if not fused:
        monkeypatch.setattr(Device, "fuse_blocks", lambda self, model: None)
    llm = make_llm(tiny_dir, **KERNELS_ON, quantization=method, quant_group_size=group)
    layer_type = type(llm.engine.runner.model.layers[0]).__name__
    assert (layer_type == "KernelQuantDecoderLayer") == fused, layer_type
    qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert qkv.quantized and qkv.weight_packed.dtype == ms.uint8
    bits = 8 if method == "int8" else 4
    assert qkv.weight_packed.shape[1] == qkv.in_features * bits // 8
    assert qkv.weight_scales.shape[1] == qkv.in_features // (group or qkv.in_features)
    ref_dir = str(tmp_path / "dequantized")
    dequantized_checkpoint(llm, tiny_dir, ref_dir)
    ref, _ = reference_logits(ref_dir, PROMPTS, str(tmp_path))
    for ours, theirs in zip(prefill_logits(llm, PROMPTS), ref):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


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
def gptq_pack(w: np.ndarray, bits: int, group: int) -> tuple[dict, np.ndarray]:
    """A float weight [N, K] -> GPTQ (v1, symmetric) qweight / qzeros / scales / g_idx, and the
    fp32 weight those stand for."""
    n, k = w.shape
    per, center = 32 // bits, 1 << (bits - 1)
    scales = (np.abs(w.reshape(n, k // group, group)).max(-1) / (center - 1)).astype(np.float16)  # [N, groups]
    s = scales.astype(np.float32).repeat(group, axis=1)
    q = np.clip(np.round(w / s) + center, 0, 2 * center - 1).astype(np.uint32)  # [N, K]
    qweight = np.zeros((k // per, n), np.uint32)
    for i in range(per):  # input k: bits b*(k % per) of word k // per
        qweight |= q.T[i::per] << np.uint32(bits * i)
    zero = np.uint32(0)
    for i in range(per):  # v1 stores each zero minus one
        zero |= np.uint32(center - 1) << np.uint32(bits * i)
    tensors = {"qweight": qweight.view(np.int32), "qzeros": np.full((k // group, n // per), zero).view(np.int32),
               "scales": np.ascontiguousarray(scales.T), "g_idx": (np.arange(k) // group).astype(np.int32)}
    return tensors, s * (q.astype(np.float32) - center)


def write_gptq(src: str, out: str, quantization_config: dict, ref: str) -> None:
    """src as a GPTQ checkpoint under `out`, and its dequantized weights (fp32) under `ref`."""
    config = json.load(open(os.path.join(src, "config.json")))
    for d in (out, ref):
        os.makedirs(d)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(src, name), d)
    json.dump(config, open(os.path.join(ref, "config.json"), "w"))
    json.dump(dict(config, quantization_config=quantization_config), open(os.path.join(out, "config.json"), "w"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    packed, dequantized = {}, dict(tensors)
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            fields, dequantized[name] = gptq_pack(w, quantization_config["bits"], quantization_config["group_size"])
            packed.update({f"{name[:-len('weight')]}{f}": v for f, v in fields.items()})
        else:
            packed[name] = w
    save_file(packed, os.path.join(out, "model.safetensors"))
    save_file(dequantized, os.path.join(ref, "model.safetensors"))


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}


def test_gptq_checkpoint_matches_transformers_on_dequantized_weights(tiny_dir, tmp_path):
    out, ref_dir = str(tmp_path / "gptq"), str(tmp_path / "ref")
    write_gptq(tiny_dir, out, GPTQ, ref_dir)
    llm = make_llm(out, **KERNELS_ON)
    assert llm.quantization == "gptq"
    assert type(llm.engine.runner.model.layers[0]).__name__ == "KernelQuantDecoderLayer"
    ref, _ = reference_logits(ref_dir, PROMPTS, str(tmp_path))
    for ours, theirs in zip(prefill_logits(llm, PROMPTS), ref):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change,needles", [
    ({"desc_act": True}, ["desc_act=true", "not supported"]),
    ({"bits": 3}, ["GPTQ bits=3 is not supported"]),
])
def test_unsupported_gptq_variant_is_one_error_line(tiny_dir, tmp_path, capsys, change, needles):
    from tests.test_cli import assert_one_error_line, generate
    out = str(tmp_path / "gptq")
    write_gptq(tiny_dir, out, GPTQ, str(tmp_path / "ref"))
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
