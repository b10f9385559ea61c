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
from tests.tiny import TINY_LLAMA, make_llm, make_tiny_model  # noqa: E402

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
    llm = make_llm(path, dtype=dtype, kernels=kernels)
    layer = llm.engine.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == (ms.float32 if dtype == "float32" else getattr(ms, dtype))
    for hf_name, want in values.items():
        np.testing.assert_array_equal(_parameter_values(llm, hf_name), want, err_msg=hf_name)


@pytest.fixture(scope="module")
def hf_reference(checkpoints, tmp_path_factory):
    """transformers (fp32 activations) on the same 16-bit files: (dtype, shards, prompts) -> the
    logits of every position of each prompt."""
    def get(dtype: str, shards: int, prompts=PROMPTS):
        path, _ = checkpoints(dtype, shards)
        return reference_logits(path, prompts, str(tmp_path_factory.mktemp("ref")))[0]
    return get


def test_sharded_bf16_checkpoint_matches_transformers(checkpoints, hf_reference):
    path, _ = checkpoints("bfloat16", SHARDS)
    llm = make_llm(path, dtype="float32", kernels="off", enable_prefix_caching=False)
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
# Roundings to fp16 on the path from a token to its logits (ops/native.py, layers/): per decoder
# layer, each of the two blocks rounds its RMSNorm twice (the cast back, then the weight), its
# projection outputs (q|k|v and o_proj; gate|up and down), its middle (RoPE'd q and k and the
# attention output; silu(gate) and its product with up), the residual scale and the residual sum:
# 8 each. Outside the layers: the scaled embedding, the final norm (2), the logit scale, the head.
ROUNDINGS_PER_LAYER = 16
ROUNDINGS_OUTSIDE_LAYERS = 5


def fp16_logit_tolerance(num_layers: int, logits: np.ndarray) -> float:
    """The fp16 path rounds each op's output to fp16 (relative error <= u = 2^-11), while its
    sums are accumulated in fp32 (MindSpore's CPU MatMul does, measured: error < u at K = 4096;
    the norm's variance, RoPE and the attention scores and softmax are computed in fp32 by our
    code), so no error grows with a sum's length; the checkpoint's fp16 weights are exact in both
    runs. Each rounding is then a relative perturbation of at most u of a tensor on the path to the
    logits, and none is amplified on the way: RMSNorm rescales each row to unit RMS (a relative
    error passes through it unchanged), a residual sum adds its terms' errors, and a matmul with
    these random weights maps a relative error of its input to the same relative error of its
    output (in norm). Summing the perturbations linearly over the R = 16 L + 5 roundings bounds
    the logits' error by R u, relative to the largest logit, since an error in the final hidden
    row spreads over every logit at the scale of the largest. Tiny model, L = 2: 37 u max|logit|,
    1.8% of it (measured: 0.15-0.25%)."""
    rounds = ROUNDINGS_PER_LAYER * num_layers + ROUNDINGS_OUTSIDE_LAYERS
    return rounds * FP16_UNIT_ROUNDOFF * float(np.abs(logits).max())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_fp16_forward_matches_fp32_transformers_within_the_derived_bound(checkpoints, hf_reference):
    """Prefill logits, then greedy decode steps (their logprobs; a log-softmax moves by at most
    twice its logits' error), against transformers on the prompts and our continuations."""
    from mindcpm import SamplingParams
    path, _ = checkpoints("float16", 1)
    llm = make_llm(path, dtype="float16", kernels="off", enable_prefix_caching=False)
    assert llm.dtype == "float16" and not llm.kernels
    assert llm.engine.runner.model.layers[0].self_attn.k_cache.dtype == ms.float16
    prefill = prefill_logits(llm, PROMPTS)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
    refs = hf_reference("float16", 1, [p + o.token_ids[:-1] for p, o in zip(PROMPTS, outs)])
    for prompt, ours, out, ref in zip(PROMPTS, prefill, outs, refs):
        tol = fp16_logit_tolerance(TINY_LLAMA["num_hidden_layers"], ref)
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, ref[:len(prompt)], atol=tol, rtol=0)
        steps = ref[len(prompt) - 1:]
        chosen = [entry[token] for entry, token in zip(out.logprobs, out.token_ids)]
        np.testing.assert_allclose(chosen, log_softmax(steps)[np.arange(len(steps)), out.token_ids],
                                   atol=2 * tol, rtol=0)
        # Greedy: each token is the reference's arg-max, or within the error bound of it.
        assert (steps.max(-1) - steps[np.arange(len(steps)), out.token_ids] <= 2 * tol).all()
