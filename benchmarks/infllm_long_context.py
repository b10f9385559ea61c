"""Long-context timing of InfLLM-v2 sparse attention against dense attention on the same engine.

    python benchmarks/infllm_long_context.py [--contexts 8192,16384,32768,65536] [--chunk 512]

A random MiniCPM4-8B-like model scaled to this machine (16 query heads per KV head, head_dim
128 by default) is written to a temporary directory and run twice, dense and with the
documented default sparse_config. For every context length C it times, on the engine's compiled
step (compile excluded, min of --repeats runs):
  decode   one decode step with C tokens in the cache;
  prefill  the chunked prefill of a C-token prompt (chunks of --chunk tokens). Each chunk's time
           is measured at --samples evenly spaced offsets and integrated (trapezoid), because a
           full dense 64K prefill takes too long on a small CPU; with --full-prefill every chunk runs.
The K/V cache is filled with random values, not by running the prefill: attention cost does not
depend on the values (the sparse selection does, but always picks the same number of blocks).

benchmark.py can wire it in with `long_context_rows(...)` (one dict per context length) and
`format_table(rows)`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# MiniCPM4-8B has 32 query heads over 2 KV heads (G = 16), head_dim 128. Scaled: one KV group,
# one layer, a narrow MLP, a small vocabulary, so that attention is what the step spends its time on.
SHAPE = dict(hidden_size=2048, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=16,
             num_key_value_heads=1)


def write_model(path: str, max_len: int, shape: dict = SHAPE) -> str:
    from safetensors.numpy import save_file
    from tests.tiny import VOCAB, write_byte_tokenizer
    rng = np.random.default_rng(0)
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    tensors = {"model.embed_tokens.weight": (VOCAB, h), "lm_head.weight": (VOCAB, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                        p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                        p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                        p + "mlp.down_proj.weight": (h, inter)})
    os.makedirs(path, exist_ok=True)
    save_file({k: (np.ones(s) if len(s) == 1 else rng.normal(0, 0.02, s)).astype(np.float32)
               for k, s in tensors.items()}, os.path.join(path, "model.safetensors"))
    cfg = dict(architectures=["MiniCPMForCausalLM"], vocab_size=VOCAB, max_position_embeddings=max_len,
               rms_norm_eps=1e-6, scale_emb=12, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=False,
               bos_token_id=256, eos_token_id=257, **shape)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_byte_tokenizer(path)
    return path


def _fill_cache(llm, seed: int = 0) -> None:
    """Random K/V (and C1/C2) everywhere, as if a prefill had run."""
    import mindspore as ms
    rng = np.random.default_rng(seed)
    for name, param in llm.engine.runner.model.parameters_and_names():
        if name.endswith(("k_cache", "v_cache", "c1_cache", "c2_cache")):
            param.set_data(ms.Tensor(rng.normal(size=param.shape).astype(np.float32)))


class _Timer:
    def __init__(self, llm, repeats: int):
        from mindcpm import SamplingParams
        from mindcpm.engine.sequence import Sequence
        self.llm, self.repeats = llm, repeats
        self.params, self.Sequence = SamplingParams(), Sequence

    def step(self, context: int, n: int) -> float:
        """Seconds of one step computing tokens [context, context + n) of a sequence."""
        runner, blocks = self.llm.engine.runner, self.llm.engine.scheduler.block_manager
        seq = self.Sequence([5] * (context + n), self.params, blocks.block_size)
        blocks.allocate(seq)
        try:
            seq.num_cached_tokens = context
            inputs, _, _ = runner.prepare([seq], [n], all_rows=False)
            runner._forward(inputs).asnumpy()  # compile (and warm)
            best = float("inf")
            for _ in range(self.repeats):
                start = time.perf_counter()
                runner.step(*inputs).asnumpy()
                best = min(best, time.perf_counter() - start)
            return best
        finally:
            blocks.deallocate(seq)


def _prefill_seconds(timer: _Timer, context: int, chunk: int, samples: int, full: bool) -> float:
    offsets = list(range(0, context, chunk))
    if full:
        return sum(timer.step(o, min(chunk, context - o)) for o in offsets)
    picks = sorted({offsets[round(i * (len(offsets) - 1) / max(samples - 1, 1))] for i in range(samples)})
    times = [timer.step(o, min(chunk, context - o)) for o in picks]
    return float(np.interp(offsets, picks, times).sum())


def long_context_rows(contexts=(8192, 16384, 32768, 65536), chunk: int = 512, repeats: int = 3,
                      samples: int = 4, full_prefill: bool = False, model_dir: str | None = None,
                      variant: str = "current", log=print) -> list[dict]:
    """Dense vs sparse decode-step and prefill seconds per context length, on one model."""
    from mindcpm import LLM
    max_len = max(contexts) + 64
    tmp = None
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="infllm_bench_")
        model_dir = write_model(tmp.name, max_len)
    rows = {c: {"context": c} for c in contexts}
    for mode in ("dense", "sparse"):
        llm = LLM(model=model_dir, max_num_seqs=1, max_model_len=max_len, max_num_batched_tokens=chunk,
                  kv_cache_gib=8.0, progress=False, enable_prefix_caching=False,
                  sparse_attention=variant if mode == "sparse" else False)
        _fill_cache(llm)
        timer = _Timer(llm, repeats)
        for c in contexts:
            rows[c][f"{mode}_decode_s"] = timer.step(c, 1)
            rows[c][f"{mode}_prefill_s"] = _prefill_seconds(timer, c, chunk, samples, full_prefill)
            log(f"{mode} {c}: decode {rows[c][f'{mode}_decode_s'] * 1e3:.1f} ms, "
                f"prefill {rows[c][f'{mode}_prefill_s']:.1f} s")
        del llm
    for r in rows.values():
        r["decode_speedup"] = r["dense_decode_s"] / r["sparse_decode_s"]
        r["prefill_speedup"] = r["dense_prefill_s"] / r["sparse_prefill_s"]
    if tmp is not None:
        tmp.cleanup()
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    lines = ["| context | decode dense ms | decode sparse ms | speed-up | prefill dense s | prefill sparse s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['dense_decode_s'] * 1e3:.1f} | {r['sparse_decode_s'] * 1e3:.1f} | "
                     f"{r['decode_speedup']:.2f}x | {r['dense_prefill_s']:.1f} | {r['sparse_prefill_s']:.1f} | "
                     f"{r['prefill_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="8192,16384,32768,65536")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--full-prefill", action="store_true")
    ap.add_argument("--variant", default="current", choices=("current", "june2025"))
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    rows = long_context_rows(tuple(int(c) for c in args.contexts.split(",")), args.chunk, args.repeats,
                             args.samples, args.full_prefill, variant=args.variant,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
