"""mindcpm/quant's formats against independent references: GGUF blocks against gguf-py's own
dequantize (bit-exact) and against decoders written here from the block layout; GPTQ tensors
packed here from the format; RTN against a quantizer written here (bf16 rounding by torch);
BitCPM ternary packing lossless, a non-ternary checkpoint refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mindcpm.quant import QuantError
from mindcpm.quant import bitcpm, gguf_blocks, gptq, rtn
from tests.quant.rounding import x_rounding_bound

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to dtype by torch, back as float32."""
    return torch.from_numpy(np.asarray(values, np.float32)).to(getattr(torch, dtype)).float().numpy()


# -- GGUF --------------------------------------------------------------------------------------------
def gguf_bytes(w: np.ndarray, type_name: str) -> np.ndarray:
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])


def decode_here(raw: np.ndarray, type_name: str, n: int, k: int) -> np.ndarray:
    """Q8_0 / Q4_0 from the block layout: fp16 d, then 32 int8 (Q8_0) or 16 bytes whose low
    nibbles are elements 0-15 and high nibbles 16-31, each minus 8 (Q4_0); w = d * q."""
    size = {"Q8_0": 34, "Q4_0": 18}[type_name]
    blocks = raw.reshape(n * k // 32, size)
    out = np.empty((n * k // 32, 32), np.float32)
    for b, block in enumerate(blocks):
        d = np.float32(block[:2].view(np.float16)[0])
        if type_name == "Q8_0":
            q = block[2:].view(np.int8).astype(np.float32)
        else:
            q = np.concatenate([block[2:] & 15, block[2:] >> 4]).astype(np.float32) - 8
        out[b] = d * q
    return out.reshape(n, k)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("n,k", [(7, 96), (1, 32), (13, 160)])
def test_gguf_blocks_dequantize_like_gguf_py(type_name, n, k):
    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1))).astype(np.float32)
    raw = gguf_bytes(w, type_name)
    qw = gguf_blocks.from_gguf(raw, type_name, (n, k))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(n, k)
    np.testing.assert_array_equal(qw.dequantize(), want)
    if type_name != "Q4_1":
        np.testing.assert_array_equal(qw.dequantize(), decode_here(raw, type_name, n, k))
    assert qw.nbytes == raw.nbytes  # the same bytes, regrouped


def test_gguf_types_without_kernel_are_named():
    assert gguf_blocks.kept_quantized("Q4_1") and not gguf_blocks.kept_quantized("Q4_K")
    with pytest.raises(QuantError, match="blk.0.ffn_down.weight: GGUF type Q4_K has no quantized kernel"):
        gguf_blocks.from_gguf(np.zeros(144, np.uint8), "Q4_K", (1, 256), "blk.0.ffn_down.weight")
    with pytest.raises(QuantError, match="not a Q8_0"):
        gguf_blocks.from_gguf(np.zeros(33, np.uint8), "Q8_0", (1, 32))


def test_gguf_weight_runs_in_the_kernel():
    ms = pytest.importorskip("mindspore")
    from mindcpm.ops import cpu_kernels
    if not cpu_kernels.kernels_available():
        pytest.skip("no g++ to build the CPU kernels")
    from mindcpm.quant.linear import KernelQuantMatmul, kernel_tensors
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    for type_name in ("Q8_0", "Q4_0", "Q4_1"):
        raw = gguf_bytes(rng.standard_normal((9, 96)).astype(np.float32), type_name)
        w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(9, 96)
        got = KernelQuantMatmul("plain")(ms.Tensor(x), *kernel_tensors(gguf_blocks.from_gguf(raw, type_name, (9, 96))))
        # the decode path rounds x to int16 per 32 inputs (tests/quant/rounding.py)
        want = x.astype(np.float64) @ w.T
        assert np.all(np.abs(got.asnumpy() - want) <= 1e-5 * np.abs(want) + 1e-4 + x_rounding_bound(x, w)), type_name


def test_default_model_tensors_kept_quantized():
    """The default SmolLM2 Q4_1 file: its Q4_1 projections as read by gguf-py's reader, decoded like
    gguf-py, and multiplied by the kernel like x times the fp32 weight (its Q8_0 embedding is left
    out: 28M values to decode twice; Q8_0 is checked on random blocks above)."""
    from mindcpm.gguf import default_model_path
    try:
        reader = gguf.GGUFReader(default_model_path())
    except FileNotFoundError as error:
        pytest.skip(str(error))
    tensors = {t.name: t for t in reader.tensors}
    norm = gguf_blocks.from_reader_tensor(tensors["blk.0.attn_norm.weight"])
    assert norm is None  # F32 vectors stay as they are
    for name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
        t = tensors[name]
        qw = gguf_blocks.from_reader_tensor(t)
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(qw.shape)
        np.testing.assert_array_equal(qw.dequantize(), want)
    ms = pytest.importorskip("mindspore")
    from mindcpm.ops import cpu_kernels
    if cpu_kernels.kernels_available():
        from mindcpm.quant.linear import KernelQuantMatmul, kernel_tensors
        x = np.random.default_rng(0).standard_normal((1, qw.shape[1])).astype(np.float32)
        got = KernelQuantMatmul("plain")(ms.Tensor(x), *kernel_tensors(qw)).asnumpy()
        y = x.astype(np.float64) @ want.T.astype(np.float64)
        assert np.all(np.abs(got - y) <= 1e-4 * np.abs(y) + 1e-4 + x_rounding_bound(x, want))  # rounding: see rounding.py


def test_gguf_qk_unpermutation_moves_whole_rows():
    from mindcpm.gguf import unpermute_qk
    rng = np.random.default_rng(4)
    n, k, heads = 16, 64, 2
    raw = gguf_bytes(rng.standard_normal((n, k)).astype(np.float32), "Q4_1")
    qw = gguf_blocks.from_gguf(raw, "Q4_1", (n, k))
    rows = unpermute_qk(np.arange(n)[:, None], heads)[:, 0]
    np.testing.assert_array_equal(qw.take_rows(rows).dequantize(), unpermute_qk(qw.dequantize(), heads))


def test_fused_rows_and_shards():
    from mindcpm.quant import concat_rows
    rng = np.random.default_rng(6)
    q, k = (rtn.quantize(rng.standard_normal((n, 64)), 4, 32, False, "float16") for n in (6, 3))
    fused = concat_rows([q, k], "qkv")
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([q.dequantize(), k.dequantize()]))
    np.testing.assert_array_equal(fused.take_rows(slice(6, 9)).dequantize(), k.dequantize())
    with pytest.raises(QuantError, match="qkv: the parts to fuse are quantized differently"):
        concat_rows([q, rtn.quantize(rng.standard_normal((2, 64)), 8)], "qkv")


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1"])
def test_input_shards_are_whole_groups_of_the_blocks(type_name):
    """A row-parallel shard of GGUF blocks (8-bit and 4-bit asymmetric) dequantizes like those
    columns of gguf-py's dequantized weight; a cut through a block is refused by name."""
    rng = np.random.default_rng(8)
    n, k = 5, 128
    raw = gguf_bytes(rng.standard_normal((n, k)).astype(np.float32), type_name)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(n, k)
    qw = gguf_blocks.from_gguf(raw, type_name, (n, k))
    for inputs in (slice(0, 64), slice(64, 128), slice(32, 96)):
        np.testing.assert_array_equal(qw.take_inputs(inputs).dequantize(), want[:, inputs])
    with pytest.raises(QuantError, match="down: inputs 48:96 of 128 do not hold whole groups of 32"):
        qw.take_inputs(slice(48, 96), "down")


# -- round to nearest --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(8, None), (8, 64), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_rtn_matches_a_quantizer_written_here(bits, group, symmetric, scale_dtype):
    rng = np.random.default_rng(bits + (group or 0))
    n, k = 5, 384
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0, :] = 0  # an all-zero row: scale 0, codes of zero
    qw = rtn.quantize(w, bits, group, symmetric, scale_dtype)
    g = k if group is None else group
    blocks = w.reshape(n, k // g, g)
    top = 2 ** bits - 1
    if symmetric:
        s = round_to(np.abs(blocks).max(-1, keepdims=True) / (2 ** (bits - 1) - 1), scale_dtype)
        q = np.clip(np.round(np.where(s > 0, blocks / np.where(s > 0, s, 1), 0)), -2 ** (bits - 1), top // 2)
        want = s * q
    else:
        lo = round_to(blocks.min(-1, keepdims=True), scale_dtype)
        s = round_to((blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / top, scale_dtype)
        q = np.clip(np.round(np.where(s > 0, (blocks - lo) / np.where(s > 0, s, 1), 0)), 0, top)
        want = s * q + lo
    np.testing.assert_array_equal(qw.dequantize(), want.reshape(n, k))
    assert qw.packed.nbytes == n * k * bits // 8


def test_quantization_names():
    assert rtn.method_settings("int8") == (8, None) and rtn.method_settings("int4", 64) == (4, 64)
    with pytest.raises(QuantError, match="unknown quantization 'int3'; choose int8 or int4"):
        rtn.method_settings("int3")


def test_rtn_group_that_does_not_divide_is_refused():
    with pytest.raises(QuantError, match="model.layers.0.mlp.down_proj.weight: group size 128 does not divide the "
                                         "input dimension 1000"):
        rtn.quantize(np.zeros((4, 1000), np.float32), 4, 128, name="model.layers.0.mlp.down_proj.weight")
    with pytest.raises(QuantError, match="4-bit groups must be a multiple of 32"):
        rtn.quantize(np.zeros((4, 96), np.float32), 4, 48)


# -- GPTQ --------------------------------------------------------------------------------------------
def pack_int32_here(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """32 / bits values of `axis` into each int32, value j of a word at bits j * bits."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, 0)
    words = np.zeros((v.shape[0] // per,) + v.shape[1:], np.uint64)
    for j in range(per):
        words |= v[j::per] << np.uint64(j * bits)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis)


def gptq_layer(rng, n, k, bits, group, sym, desc_act, fmt):
    """(qweight, qzeros, scales, g_idx, the fp32 weight [N, K] they stand for)."""
    groups = k // group
    q = rng.integers(0, 2 ** bits, (k, n))
    z = np.full((groups, n), 2 ** (bits - 1)) if sym else rng.integers(0, 2 ** bits, (groups, n))
    scales = rng.uniform(0.001, 0.05, (groups, n)).astype(np.float16)
    g_idx = np.arange(k) // group
    if desc_act:
        g_idx = rng.permutation(g_idx)
    stored_z = (z - 1) % 2 ** bits if fmt == "gptq" else z
    w = scales.astype(np.float32)[g_idx] * (q - z[g_idx]).astype(np.float32)  # [K, N]
    return pack_int32_here(q, bits, 0), pack_int32_here(stored_z, bits, 1), scales, g_idx.astype(np.int32), w.T


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("fmt,group", [("gptq", 32), ("gptq_v2", 64), ("gptq", -1)])
def test_gptq_unpacks_like_the_format(bits, sym, desc_act, fmt, group):
    rng = np.random.default_rng(bits * 3 + sym + 2 * desc_act)
    n, k = 24, 128
    layer = gptq_layer(rng, n, k, bits, k if group == -1 else group, sym, desc_act, fmt)
    config = gptq.check_config({"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                "desc_act": desc_act, "checkpoint_format": fmt})
    qw = gptq.from_gptq(*layer[:4], config, "model.layers.0.self_attn.q_proj")
    w = layer[4]
    perm = np.arange(k) if qw.input_perm is None else qw.input_perm
    np.testing.assert_array_equal(qw.dequantize(), w[:, perm])  # bit-exact, act-order applied to x
    assert (qw.offsets is None) == sym


@pytest.mark.parametrize("config,match", [
    ({"quant_method": "awq", "bits": 4}, "quantization method 'awq' is not supported"),
    ({"bits": 3, "group_size": 128}, "GPTQ bits=3 is not supported"),
    ({"bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"bits": 4, "group_size": 0}, "group_size=0 is not supported"),
])
def test_gptq_unsupported_variants_are_named(config, match):
    with pytest.raises(QuantError, match=match):
        gptq.check_config(config)


def test_gptq_config_is_read_from_either_file(tmp_path):
    assert gptq.read_config(str(tmp_path)) is None
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": True}))
    assert gptq.read_config(str(tmp_path)) == {"bits": 4, "group_size": 128, "sym": True, "desc_act": True,
                                               "checkpoint_format": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 8, "group_size": -1, "sym": False}}))
    assert gptq.read_config(str(tmp_path))["bits"] == 8


def test_gptq_act_order_without_desc_act_is_refused():
    rng = np.random.default_rng(0)
    layer = gptq_layer(rng, 8, 64, 4, 32, True, True, "gptq")
    config = gptq.check_config({"bits": 4, "group_size": 32, "desc_act": False})
    with pytest.raises(QuantError, match="q_proj.g_idx reorders the inputs but desc_act is false"):
        gptq.from_gptq(*layer[:4], config, "q_proj")


# -- BitCPM ternary ----------------------------------------------------------------------------------
def ternary(rng, n, k, group):
    s = round_to(rng.uniform(0.01, 0.1, (n, k // group, 1)), "bfloat16")
    t = rng.integers(-1, 2, (n, k // group, group))
    return (s * t).reshape(n, k).astype(np.float32)


@pytest.mark.parametrize("group,found", [(96, 96), (64, 64), (32, 32)])
def test_bitcpm_ternary_packs_losslessly(group, found):
    rng = np.random.default_rng(group)
    w = ternary(rng, 5, 192 if group != 96 else 96, group)
    qw = bitcpm.ternary_weight(w, "bfloat16", "w")
    np.testing.assert_array_equal(qw.dequantize(), w)
    assert qw.bits == 2 and qw.group_size == found and qw.packed.nbytes == w.size // 4


def test_bitcpm_refuses_the_first_non_ternary_tensor():
    rng = np.random.default_rng(1)
    good = ternary(rng, 4, 64, 32)
    bad = good.copy()
    bad[2, 40] = 1.5 * np.abs(good[2, 32:]).max()  # a fourth value in one group
    with pytest.raises(QuantError, match="model.layers.0.mlp.up_proj.weight is not ternary"):
        bitcpm.ternary_checkpoint({"model.layers.0.mlp.gate_proj.weight": good,
                                   "model.layers.0.mlp.up_proj.weight": bad, "later": bad})
