"""Checkpoints as Ascend users have them: bf16 and fp16 safetensors, one file or sharded with
model.safetensors.index.json, written here with safetensors' framework-free API from a tiny random
Llama. The loaded values are compared with the stored bits (converted by numpy, not by MindSpore),
the logits with transformers reading the same files; a broken sharded checkpoint is one error line.
Then the native backend's fp16 activation path against transformers in fp32."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
import safetensors  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from tests.engine_probe import prefill_logits  # noqa: E402
from tests.reference.hf_llama import reference_logits  # noqa: E402
from tests.tiny import TINY_LLAMA, make_tiny_model  # noqa: E402

PROMPTS = [[256, 5, 9, 33, 7], list(range(2, 40)), [256] + list(range(100, 117))]
SHARDS = 3


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, rounded to nearest even as torch's conversion does (no NaNs here)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# dtype -> (fp32 -> the array whose bytes are stored, stored array -> its exact fp32 values)
STORE = {"bfloat16": (bf16_bits, bf16_values),
         "float16": (lambda x: x.astype(np.float16), lambda h: h.astype(np.float32))}


def write_checkpoint(src: str, out: str, dtype: str, shards: int = 1) -> dict[str, np.ndarray]:
    """src's fp32 checkpoint stored in `dtype` under `out`: model.safetensors, or `shards` files
    (tensors dealt round-robin, so one layer's q, k and v sit in different files) and the index.
    Returns the exact fp32 values of what was stored."""
    encode, decode = STORE[dtype]
    os.makedirs(out)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), out)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 \
        else ["model.safetensors"]
    weight_map = {name: files[i % len(files)] for i, name in enumerate(names)}
    stored = {name: np.ascontiguousarray(encode(tensors[name])) for name in names}
    for file in files:
        specs = {n: safetensors.TensorSpec(dtype=dtype, shape=list(a.shape), data_ptr=a.ctypes.data,
                                           data_len=a.nbytes)
                 for n, a in stored.items() if weight_map[n] == file}
        safetensors.serialize_file(specs, os.path.join(out, file), {"format": "pt"})
    if shards > 1:
        total = sum(a.nbytes for a in stored.values())
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return {name: decode(a) for name, a in stored.items()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_16bit")))


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """(dtype, shards) -> (directory, exact stored values), written once per module."""
    root, made = tmp_path_factory.mktemp("ckpt16"), {}

    def get(dtype: str, shards: int):
        if (dtype, shards) not in made:
            out = str(root / f"{dtype}-{shards}")
            made[dtype, shards] = out, write_checkpoint(tiny_dir, out, dtype, shards)
        return made[dtype, shards]
    return get


def _llm(path, **kw):
    from mindcpm import LLM
    return LLM(model=path, progress=False, max_model_len=64, **kw)


def _parameter_values(llm, hf_name: str) -> np.ndarray:
    """The fp32 values of a checkpoint tensor as the model holds it (its rows of a fused parameter)."""
    from mindcpm.loader import our_name
    model = llm.engine.runner.model
    name, part = our_name(hf_name)
    param = dict(model.parameters_and_names())[name]
    values = param.astype(ms.float32).asnumpy() if param.dtype != ms.float32 else param.asnumpy()
    if part is None:
        return values
    return values[dict(model.cells_and_names())[name.rsplit(".", 1)[0]].part_rows(part)]


# (stored dtype, shards, LLM dtype, kernels): fp32 activations; 16-bit weights kept as stored
# (bf16 needs the CPU kernels); fp16 activations with MindSpore's own ops.
LOADS = [("bfloat16", 1, "float32", "off"), ("bfloat16", SHARDS, "float32", "off"),
         ("bfloat16", SHARDS, "bfloat16", "on"), ("float16", 1, "float16", "off"),
         ("float16", SHARDS, "float16", "on")]


@pytest.mark.parametrize("stored,shards,dtype,kernels", LOADS)
def test_16bit_checkpoint_loads_the_stored_values(checkpoints, stored, shards, dtype, kernels):
    from mindcpm.ops.cpu_kernels import kernels_available
    if kernels == "on" and not kernels_available():
        pytest.skip("no g++ to build the CPU kernels")
    path, values = checkpoints(stored, shards)
    llm = _llm(path, dtype=dtype, kernels=kernels)
    layer = llm.engine.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == (ms.float32 if dtype == "float32" else getattr(ms, dtype))
    for hf_name, want in values.items():
        np.testing.assert_array_equal(_parameter_values(llm, hf_name), want, err_msg=hf_name)


@pytest.fixture(scope="module")
def hf_reference(checkpoints, tmp_path_factory):
    """transformers (fp32 activations) on the same 16-bit files: (dtype, shards) -> logits per prompt."""
    def get(dtype: str, shards: int):
        path, _ = checkpoints(dtype, shards)
        return reference_logits(path, PROMPTS, str(tmp_path_factory.mktemp("ref")))[0]
    return get


def test_sharded_bf16_checkpoint_matches_transformers(checkpoints, hf_reference):
    path, _ = checkpoints("bfloat16", SHARDS)
    llm = _llm(path, dtype="float32", kernels="off", enable_prefix_caching=False)
    for ours, ref in zip(prefill_logits(llm, PROMPTS), hf_reference("bfloat16", SHARDS)):
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# -- a broken sharded checkpoint: one error line naming the problem ---------------------------------
def _break(path: str, case: str) -> None:
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        text = f.read()
    weight_map = json.loads(text)["weight_map"]
    if case == "missing_shard":
        os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    elif case == "truncated_shard":
        shard = os.path.join(path, "model-00003-of-00003.safetensors")
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    elif case == "shard_lacks_tensor":  # a stale index: it places a tensor of shard 2 in shard 1
        moved = next(name for name, shard in sorted(weight_map.items()) if shard.startswith("model-00002"))
        weight_map[moved] = "model-00001-of-00003.safetensors"
        with open(index, "w") as f:
            json.dump({"weight_map": weight_map}, f)
    elif case == "corrupt_index":
        with open(index, "w") as f:
            f.write(text[: len(text) // 2])
    elif case == "no_weight_map":
        with open(index, "w") as f:
            json.dump({"metadata": {"total_size": 1}}, f)


BROKEN = {
    "missing_shard": ["model.safetensors.index.json names model-00002-of-00003.safetensors, which is missing"],
    "truncated_shard": ["model-00003-of-00003.safetensors", "corrupt or truncated"],
    "shard_lacks_tensor": ["model-00001-of-00003.safetensors has no tensor model.",
                           "which model.safetensors.index.json places in it"],
    "corrupt_index": ["cannot read", "model.safetensors.index.json"],
    "no_weight_map": ["model.safetensors.index.json", "no weight_map"],
}


@pytest.fixture
def broken(checkpoints, tmp_path):
    def make(case: str) -> str:
        path = str(tmp_path / case)
        shutil.copytree(checkpoints("bfloat16", SHARDS)[0], path)
        _break(path, case)
        return path
    return make


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_sharded_checkpoint_is_one_error_line_and_status_1(broken, case, capsys):
    from tests.test_cli import assert_one_error_line, generate
    status = generate.main(["--model", broken(case), "--dtype", "float32", "--kernels", "off", "x"])
    captured = capsys.readouterr()
    assert status == 1, (captured.out, captured.err)
    assert "\n" not in assert_one_error_line(captured.err, *BROKEN[case])
    assert captured.out == ""


def test_missing_shard_through_the_cli_process(broken, tmp_path):
    from tests.test_cli import assert_one_error_line, run_script
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_script("generate.py", "--model", broken("missing_shard"), "x", cwd=cwd)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == [assert_one_error_line(proc.stderr, *BROKEN["missing_shard"])]


# -- fp16 activations -----------------------------------------------------------------------------
FP16_UNIT_ROUNDOFF = 2.0 ** -11
# Rounding points on the path from the token to its logits, per decoder layer: the normalised
# input of q|k|v, q|k|v, RoPE'd q and k, the attention output, o_proj, the residual sum; the
# normalised input of gate|up, gate|up, silu(gate) * up, down, the residual sum. Plus the
# embedding, the final norm and the logits.
ROUNDINGS_PER_LAYER = 12
ROUNDINGS_OUTSIDE_LAYERS = 3


def fp16_logit_tolerance(num_layers: int, logits: np.ndarray) -> float:
    """The fp16 path rounds each op's output to fp16 (relative error <= u = 2^-11) and MindSpore's
    CPU kernels accumulate its sums (matmul, norm variance, softmax) in fp32, so no error grows
    with a sum's length; the checkpoint's fp16 weights are exact in both runs. Every rounding is
    a relative perturbation of at most u of a tensor on the path to the logits: RMSNorm rescales
    each row to unit RMS (relative errors pass through it unamplified), a residual sum adds its
    terms' errors, and a matmul with these random weights maps a relative error of its input to
    the same relative error of its output (in norm). Summing the perturbations linearly over the
    R = 12 L + 3 rounding points bounds the logits' relative error by R u; relative to the
    largest logit, since an error in the final hidden row spreads over every logit at the scale
    of the largest. Tiny model, L = 2: 27 u * max|logit| ~ 1.3% of it (measured: ~0.2%)."""
    rounds = ROUNDINGS_PER_LAYER * num_layers + ROUNDINGS_OUTSIDE_LAYERS
    return rounds * FP16_UNIT_ROUNDOFF * float(np.abs(logits).max())


def test_fp16_forward_matches_fp32_transformers_within_the_derived_bound(checkpoints, hf_reference):
    path, _ = checkpoints("float16", 1)
    llm = _llm(path, dtype="float16", kernels="off", enable_prefix_caching=False)
    assert llm.dtype == "float16" and not llm.kernels
    assert llm.engine.runner.model.layers[0].self_attn.k_cache.dtype == ms.float16
    for ours, ref in zip(prefill_logits(llm, PROMPTS), hf_reference("float16", 1)):
        assert np.isfinite(ours).all()
        tol = fp16_logit_tolerance(TINY_LLAMA["num_hidden_layers"], ref)
        np.testing.assert_allclose(ours, ref, atol=tol, rtol=0)
