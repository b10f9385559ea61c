"""Tensor parallelism: 2 ranks started by msrun (mccl on CPU) against the single-process model,
whose own equality with transformers is tests/models/test_minicpm.py's."""
from __future__ import annotations

import glob
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.engine_probe import prefill_logits
from tests.tiny import TINY_LLAMA, write_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[256, 5, 9, 33, 7, 1, 2], list(range(2, 30)), [256, 80]]

LLAMA = dict(TINY_LLAMA, architectures=["LlamaForCausalLM"])  # 2 KV heads: one per rank
# 1 KV head (each rank keeps a copy), tied head, μP scales, an odd vocabulary (padded last rank).
MINICPM = dict(TINY_LLAMA, architectures=["MiniCPMForCausalLM"], num_key_value_heads=1, vocab_size=261,
               scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
MINICPM.pop("tie_word_embeddings")


def write_checkpoint(path: str, cfg: dict, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def w(*shape):
        return rng.normal(0, 0.08, shape).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": rng.uniform(0.7, 1.3, h).astype(np.float32)}
    if cfg.get("tie_word_embeddings") is False:
        tensors["lm_head.weight"] = w(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                        p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                        p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                        p + "mlp.down_proj.weight": w(h, inter)})
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[p + norm + ".weight"] = rng.uniform(0.7, 1.3, h).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_byte_tokenizer(path)
    return path




def port_taken(log_dir: str) -> bool:
    for path in glob.glob(os.path.join(log_dir, "*.log")):
        with open(path, errors="replace") as f:
            if "Address already in use" in f.read():
                return True
    return False


def run_ranks(model_dir: str, tmp: str, rank1_dir: str | None = None, timeout: int = 300, kernels: str = "auto",
              expert_parallel: bool = False, attempts: int = 3, extra_env: dict | None = None):
    """Two ranks under msrun, logs in tmp/log; bounded by `timeout` seconds (an exception past it)."""
    from mindcpm.parallel import msrun_command
    out = os.path.join(tmp, "tp.npz")
    argv = [os.path.join(ROOT, "tests", "tp_worker.py"), model_dir, out, "2"] + ([rank1_dir] if rank1_dir else [])
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", MINDCPM_TEST_KERNELS=kernels,
               MINDCPM_TEST_EP="1" if expert_parallel else "0", **(extra_env or {}))
    for attempt in range(attempts):
        log_dir = os.path.join(tmp, "log" if attempt == 0 else f"log{attempt}")
        command = msrun_command(2, argv, log_dir)  # a fresh reserved port each attempt
        proc = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode == 0 or not port_taken(log_dir):
            return proc, out, log_dir
    return proc, out, log_dir


def single_process(model_dir: str, kernels: str):
    from mindcpm import LLM, SamplingParams
    llm = LLM(model_dir, max_model_len=128, max_num_seqs=4, progress=False, kernels=kernels)
    logits = prefill_logits(llm, PROMPTS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    return logits, [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("cfg, kernels", [(LLAMA, "off"), (MINICPM, "auto")],
                         ids=["llama-kv-split-native", "minicpm-kv-replicated-tied-kernels"])
def test_two_ranks_equal_one(tmp_path, cfg, kernels):
    model_dir = write_checkpoint(str(tmp_path / "model"), cfg)
    proc, out, _ = run_ranks(model_dir, str(tmp_path), kernels=kernels)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = np.load(out)
    ref_logits, ref_tokens = single_process(model_dir, kernels)
    for i, ref in enumerate(ref_logits):
        np.testing.assert_allclose(ranks[f"logits{i}"], ref, atol=1e-5, rtol=0)
    assert json.loads(str(ranks["tokens"])) == ref_tokens


# -- quantized weights split across ranks ---------------------------------------------------------
ROW_PARALLEL = ("o_proj", "down_proj")  # split by inputs: each rank quantizes its share of every row
GGUF_TYPES = {"q_proj": "Q4_1", "k_proj": "Q4_1", "v_proj": "Q4_1", "o_proj": "Q4_1",
              "gate_proj": "Q8_0", "up_proj": "Q8_0", "down_proj": "Q8_0"}


def rtn_numpy(w: np.ndarray, bits: int, group: int | None, shards: int = 1) -> np.ndarray:
    """What symmetric round-to-nearest codes with fp16 scales stand for, from the math: per group
    s = fp16(max|w| / (2^(bits-1) - 1)), c = round(w / s), w' = s c. shards > 1: the inputs cut
    into that many parts quantized apart, as the ranks of a row-parallel projection do."""
    if shards > 1:
        return np.concatenate([rtn_numpy(part, bits, group) for part in np.split(w, shards, axis=1)], axis=1)
    n, k = w.shape
    group, center = group or k, 1 << (bits - 1)
    g = w.reshape(n, k // group, group)
    s = (np.abs(g).max(-1, keepdims=True) / np.float32(center - 1)).astype(np.float16).astype(np.float32)
    codes = np.clip(np.round(g / s), -center, center - 1)
    return (s * codes).reshape(n, k)


def copy_model(src: str, out: str, tensors: dict, **config) -> str:
    """src's config (updated by `config`) and tokenizer with `tensors` as its weights."""
    from safetensors.numpy import save_file as save
    os.makedirs(out)
    with open(os.path.join(src, "config.json")) as f:
        cfg = dict(json.load(f), **config)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_byte_tokenizer(out)
    save(tensors, os.path.join(out, "model.safetensors"))
    return out


def rtn_reference(src: str, out: str, bits: int, group: int | None) -> str:
    """src's weights as a quantized-on-load model of 2 ranks holds them, dequantized: rows are
    quantized alone (a column shard = those rows of the whole weight's codes), row-parallel
    inputs by rank; the head (the tied embedding's, quantized) by vocab rows."""
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            tensors[name] = rtn_numpy(w, bits, group, 2 if name.split(".")[-2] in ROW_PARALLEL else 1)
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    tensors["lm_head.weight"] = rtn_numpy(head, bits, group)
    return copy_model(src, out, tensors, tie_word_embeddings=False)


def gguf_blocks_model(src: str, out: str) -> str:
    """src as mindcpm's import of a GGUF file whose projections are Q4_1 / Q8_0 (GGUF_TYPES): their
    blocks (mindcpm/gguf.py's QUANTIZED_FILE), and as model.safetensors the float values gguf-py
    dequantizes them to, which transformers runs as the reference."""
    import gguf
    from safetensors.numpy import load_file, save_file as save
    from mindcpm.gguf import QUANTIZATION_INFO, QUANTIZED_FILE
    from mindcpm.quant.gguf_blocks import from_gguf
    tensors, blocks = load_file(os.path.join(src, "model.safetensors")), {}
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            kind = gguf.GGMLQuantizationType[GGUF_TYPES[name.split(".")[-2]]]
            raw = gguf.quants.quantize(w, kind)
            tensors[name] = gguf.quants.dequantize(raw, kind).reshape(w.shape)
            qw = from_gguf(raw, kind.name, w.shape, name)
            blocks.update({f"{name}.packed": qw.packed, f"{name}.scales": qw.scales})
            if qw.offsets is not None:
                blocks[f"{name}.offsets"] = qw.offsets
    copy_model(src, out, tensors)
    save(blocks, os.path.join(out, QUANTIZED_FILE))
    with open(os.path.join(out, QUANTIZATION_INFO), "w") as f:
        json.dump({"projection_types": sorted(set(GGUF_TYPES.values())), "kept": True}, f)
    return out


def test_quantized_two_ranks_match_transformers_on_dequantized_shards(tmp_path):
    """One launch, four models of 2 ranks, each against transformers (fp32) on the dequantized
    weights the ranks hold together; the tolerance is the kernels' fp32 accumulation order (prefill's
    x kept as it is: MINDCPM_QUANT_GEMM=fp32; tests/quant checks the default's int16 x).
    - int8 per channel, tied head of an odd vocabulary, one KV head copied to both ranks: o_proj /
      down get each rank's own scale per row (the reference quantizes their input halves apart);
    - int4 in groups of 32: every shard holds whole groups, so the codes are the 1-rank model's;
    - GGUF Q4_1 / Q8_0 blocks kept quantized: rows and whole 32-blocks cut out, never re-quantized;
    - GPTQ 4-bit, groups of 32, desc_act false: the same cuts of the unpacked codes."""
    from mindcpm.ops.cpu_kernels import kernels_available
    from tests.quant.test_quantized_model import GPTQ, write_gptq
    from tests.reference.hf_llama import reference_logits_each
    if not kernels_available():
        pytest.skip("no g++ to build the CPU kernels")
    llama = dict(LLAMA, model_type="llama")  # transformers reads the references
    tied = write_checkpoint(str(tmp_path / "tied"), dict(llama, tie_word_embeddings=True, vocab_size=261,
                                                         num_key_value_heads=1))
    llama = write_checkpoint(str(tmp_path / "llama"), llama)
    write_gptq(llama, str(tmp_path / "gptq"), GPTQ, str(tmp_path / "gptq_ref"))
    cases = {"int8": ({"model": tied, "quantization": "int8"}, rtn_reference(tied, str(tmp_path / "int8_ref"), 8, None)),
             "int4": ({"model": llama, "quantization": "int4", "quant_group_size": 32},
                      rtn_reference(llama, str(tmp_path / "int4_ref"), 4, 32)),
             "gguf": ({"model": gguf_blocks_model(llama, str(tmp_path / "gguf"))}, str(tmp_path / "gguf")),
             "gptq": ({"model": str(tmp_path / "gptq")}, str(tmp_path / "gptq_ref"))}
    with open(tmp_path / "cases.json", "w") as f:
        json.dump({name: options for name, (options, _) in cases.items()}, f)
    proc, out, _ = run_ranks(str(tmp_path / "cases.json"), str(tmp_path), kernels="on",
                             extra_env={"MINDCPM_QUANT_GEMM": "fp32"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = np.load(out)
    references = reference_logits_each([ref_dir for _, ref_dir in cases.values()], PROMPTS, str(tmp_path), 8)
    for name, (ref_logits, ref_tokens) in zip(cases, references):
        assert str(ranks[f"{name}/quantization"]) == name  # kept quantized, not run as dequantized floats
        for i, ref in enumerate(ref_logits):
            np.testing.assert_allclose(ranks[f"{name}/logits{i}"], ref, atol=1e-4, rtol=0, err_msg=name)
        assert json.loads(str(ranks[f"{name}/tokens"])) == ref_tokens, name


def test_row_parallel_shard_of_part_of_a_group_is_refused_in_one_line(monkeypatch):
    """int4 in groups of 64 over 2 ranks: a row-parallel projection's 64 inputs give each rank
    32, half a group, which it cannot quantize on its own (column shards keep every input)."""
    from mindcpm import parallel
    from mindcpm.layers.linear import Linear
    from mindcpm.ops.device import Device
    from mindcpm.quant import QuantError
    monkeypatch.setattr(parallel, "_group", parallel.TPGroup(0, 2))
    device = Device(kernels=True, quantization="int4", quant_group_size=64)
    with pytest.raises(QuantError) as error:
        Linear(64, 64, parallel="row", device=device)
    assert str(error.value) == ("int4 quantization: group size 64 does not divide the input dimension 32 "
                                "(tensor_parallel_size 2 gives each rank 32 of a row-parallel projection's 64 inputs)")


def test_act_order_weight_shards_by_outputs_and_refuses_a_split_of_its_inputs(monkeypatch):
    """A GPTQ act-order weight over 2 ranks: a column-parallel rank keeps its rows and the whole
    input order; a row-parallel rank's half of the inputs lies in every group: one line."""
    from mindcpm import parallel
    from mindcpm.layers.linear import Linear
    from mindcpm.ops.device import Device
    from mindcpm.quant import QuantError
    from mindcpm.quant.rtn import quantize
    monkeypatch.setattr(parallel, "_group", parallel.TPGroup(1, 2))
    rng = np.random.default_rng(0)
    perm = rng.permutation(64)
    qw = quantize(rng.standard_normal((64, 64)).astype(np.float32), 4, 32)
    qw.input_perm = perm
    device = Device(kernels=True, quantization="gptq")
    column = Linear(64, 64, parallel="column", device=device).quant.rank_part(qw, None, "q_proj")
    np.testing.assert_array_equal(column.dequantize(), qw.dequantize()[32:])
    np.testing.assert_array_equal(column.input_perm, perm)
    with pytest.raises(QuantError) as error:
        Linear(64, 64, parallel="row", device=device).quant.rank_part(qw, None, "model.layers.0.mlp.down_proj")
    assert str(error.value) == ("model.layers.0.mlp.down_proj: a GPTQ act-order (desc_act) weight cannot be split by "
                                "its inputs, as a row-parallel projection is for tensor parallelism; run it on one rank")


@pytest.fixture(scope="module")
def minimax_reference(tmp_path_factory):
    """A tiny MiniMax and its single-process logits and tokens (one reference for both splits)."""
    from tests.tiny_minimax import make_tiny_minimax, minimax_config
    cfg = minimax_config(hidden=64, heads=4, head_dim=16, kv_heads=2, attn_types=(0, 1, 0), intermediate=32)
    model_dir = make_tiny_minimax(str(tmp_path_factory.mktemp("minimax") / "model"), cfg, seed=2)
    return (model_dir, *single_process(model_dir, "off"))


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-sliced", "experts-per-rank"])
def test_minimax_two_ranks_equal_one(tmp_path, minimax_reference, expert_parallel):
    """Lightning heads (with their slopes) and the norm over all H*D split across ranks; MoE
    experts sliced within or held whole per rank; softmax layers' KV heads split."""
    model_dir, ref_logits, ref_tokens = minimax_reference
    proc, out, _ = run_ranks(model_dir, str(tmp_path), kernels="off", expert_parallel=expert_parallel)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = np.load(out)
    for i, ref in enumerate(ref_logits):
        np.testing.assert_allclose(ranks[f"logits{i}"], ref, atol=1e-5, rtol=0)
    assert json.loads(str(ranks["tokens"])) == ref_tokens


def test_a_failing_rank_stops_every_rank(tmp_path):
    model_dir = write_checkpoint(str(tmp_path / "model"), LLAMA)
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        os.link(os.path.join(model_dir, name), os.path.join(broken, name))  # no weights at all
    # Rank 0 must not wait for msrun's 120 s cluster timeout: the whole run is bounded well below
    # the time that would take plus a normal run's (TimeoutExpired fails the test).
    proc, out, log_dir = run_ranks(model_dir, str(tmp_path), rank1_dir=broken, timeout=150)
    assert proc.returncode != 0 and not os.path.exists(out)
    rank0 = open(os.path.join(log_dir, "worker_0.log")).read()
    assert "rank 1 failed: no model.safetensors" in rank0, rank0[-2000:]


def test_tensor_parallel_outside_msrun_names_the_command(tmp_path):
    from mindcpm import LLM
    from mindcpm.parallel import ParallelError
    model_dir = write_checkpoint(str(tmp_path / "model"), LLAMA)
    with pytest.raises(ParallelError, match="msrun --worker_num=2"):
        LLM(model_dir, tensor_parallel_size=2, progress=False)


def test_generate_cli_tp_starts_the_ranks(tmp_path):
    from mindcpm import LLM, SamplingParams
    import sys
    model_dir = write_checkpoint(str(tmp_path / "model"), LLAMA)
    out = str(tmp_path / "out.json")
    cmd = [sys.executable, os.path.join(ROOT, "generate.py"), "--model", model_dir, "--tp", "2", "--no-chat",
           "--max-tokens", "6", "--max-model-len", "64", "--output", out, "hello there"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=dict(os.environ, GLOG_v="3"), timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        ranks = json.load(f)["results"][0]
    llm = LLM(model_dir, max_model_len=64, progress=False)
    alone = llm.generate("hello there", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    assert ranks["token_ids"] == alone.token_ids and ranks["text"] in proc.stdout


def test_generate_cli_tp_without_msrun_prints_the_command(tmp_path):
    import sys
    os.symlink(sys.executable, tmp_path / "python")  # an interpreter with no msrun beside it
    cmd = [str(tmp_path / "python"), os.path.join(ROOT, "generate.py"), "--model", str(tmp_path), "--tp", "2", "hi"]
    proc = subprocess.run(cmd, env=dict(os.environ, PATH="/nonexistent"), timeout=120, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --tp 2 needs msrun") and "msrun --worker_num=2" in proc.stderr
    assert proc.stderr.count("\n") == 1
