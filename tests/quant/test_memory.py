"""Peak resident memory of a model quantized on load: an int4 model's peak RSS exceeds a tiny
model's run by at most 1.15x what it must hold, its parameters as held (packed codes, scales,
norms, embedding, KV cache; both runs int4 in groups of 32 with the same small KV cache): no
full-precision copy of the weights is resident, not even while loading, nor after it (the RSS
once loaded, before generating, is bound the same way). Each run is a process of its own; the
peak is the kernel's VmHWM (a child's ru_maxrss would inherit the parent's). The checkpoint's fp32
matrices (~140 MB) are ~7x the int4 codes and scales, so a copy of them, or of one layer's worth
too many, breaks the bound."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.paths import ROOT
from tests.tiny import TINY_LLAMA, write_byte_tokenizer

# Weights dominate: 3 layers of hidden 1024 / intermediate 3072 (11.8 M weights a layer), a small vocabulary.
BIG = dict(TINY_LLAMA, hidden_size=1024, intermediate_size=3072, num_hidden_layers=3, num_attention_heads=16,
           num_key_value_heads=4)
# The baseline has as many layers: running costs ~5.5 MiB a decoder layer whatever its width (its
# compiled graphs; measured peaks of the tiny model: 448 MiB with 2 layers, 454 with 3, 470 with 6),
# which a shallower baseline would charge to the weights.
TINY = dict(TINY_LLAMA, num_hidden_layers=BIG["num_hidden_layers"])

RUN = r"""
import json, sys
from mindcpm import LLM, SamplingParams
from mindcpm.bench import peak_rss
from mindcpm.layers.linear import QuantSlot
llm = LLM(model=sys.argv[1], quantization="int4", quant_group_size=32, kernels="on", progress=False, max_model_len=64,
          block_size=16, kv_cache_gib=0.01, enable_prefix_caching=False)
loaded = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:")][0]
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))
model = llm.engine.runner.model
# Parameters, and the quantized layers' tensors the CPU holds as graph constants instead.
held = {id(p): p.nbytes for _, p in model.parameters_and_names()}
for _, cell in model.cells_and_names():
    if isinstance(getattr(cell, "quant", None), QuantSlot):
        held.update({id(t): t.nbytes for t in (cell.weight_packed, cell.weight_scales, cell.weight_offsets)})
print(json.dumps({"peak": peak_rss(), "loaded": loaded, "held": sum(held.values())}))
"""


def write_llama(path: str, cfg: dict) -> str:
    """A Llama checkpoint of random fp32 weights written straight with numpy (N(0, 0.02^2))."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    h, i, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "lm_head.weight": (cfg["vocab_size"], h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                       p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    tensors = {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) for name, shape in shapes.items()}
    tensors["model.norm.weight"] = np.ones(h, np.float32)
    for n in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{n}.{norm}.weight"] = np.ones(h, np.float32)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32"), f)
    write_byte_tokenizer(path)
    return path


def measure(path: str) -> dict:
    """{"peak": peak RSS, "loaded": RSS once loaded, "held": bytes of the model's parameters} of an
    int4 run (groups of 32, a small KV cache) in a process of its own."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3")
    out = subprocess.run([sys.executable, "-c", RUN, path], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_int4_peak_memory_is_its_packed_weights_and_cache(tmp_path):
    from mindcpm.ops.cpu_kernels import kernels_available
    if not kernels_available():
        pytest.skip("no g++ to build the CPU kernels")
    big_dir = write_llama(str(tmp_path / "big"), BIG)
    fp32_bytes = os.path.getsize(os.path.join(big_dir, "model.safetensors"))
    tiny, big = measure(write_llama(str(tmp_path / "tiny"), TINY)), measure(big_dir)
    held = big["held"]
    assert held < fp32_bytes / 5, (held, fp32_bytes)  # the matrices are held as int4
    # Measured here: the peak grows 0.92-0.94x what is held (the KV cache is counted whole but only
    # its written pages are resident), once loaded 0.9x. Before each slab's checkpoint pages were
    # dropped as read and glibc's freed heap returned after each quantized parameter, once loaded
    # was 1.57x (the holes the slab temporaries left between the codes). A full fp32 copy of the
    # matrices would be 5x.
    for what in ("peak", "loaded"):
        grown = big[what] - tiny[what]
        assert grown <= 1.15 * held, (f"{what} RSS grew {grown / 2**20:.1f} MiB over the tiny model's run; "
                                      f"the int4 model holds {held / 2**20:.1f} MiB "
                                      f"(fp32 checkpoint {fp32_bytes / 2**20:.0f} MiB)")
