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
              expert_parallel: bool = False, attempts: int = 3):
    """Two ranks under msrun, logs in tmp/log; bounded by `timeout` seconds (an exception past it)."""
    from mindcpm.parallel import msrun_command
    out = os.path.join(tmp, "tp.npz")
    argv = [os.path.join(ROOT, "tests", "tp_worker.py"), model_dir, out, "2"] + ([rank1_dir] if rank1_dir else [])
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", MINDCPM_TEST_KERNELS=kernels,
               MINDCPM_TEST_EP="1" if expert_parallel else "0")
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
