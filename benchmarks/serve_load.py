#!/usr/bin/env python
"""A bounded load run of mindcpm.serve on loopback, against offline LLM.generate. Not a test.

    python benchmarks/serve_load.py --model /path/to/checkpoint [--clients 32] [--requests 200]

Starts the server (--max-num-seqs = --clients), warms it up with one pass of the load
(compiling the shapes this traffic needs, as the offline run's first call does), then sends
--requests greedy streaming completions
from --clients concurrent clients (each request --max-tokens tokens, EOS ignored, so every
answer has a known length), then checks that each answer came exactly once and complete, with no
error and every KV block free at the end. Prints p50/p99 time to first token and inter-token
latency (gaps between streamed chunks), and aggregate generated tokens/s against LLM.generate on
the same prompts in this process after the server has stopped (the CPU is not shared).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    return p.parse_args()


def prompts(n: int) -> list[str]:
    words = "river mountain city harbour forest desert valley island bridge tower".split()
    return [f"Request {i}: tell me about the {words[i % 10]} and the {words[(3 * i) % 10]}." for i in range(n)]


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    times, text, usage = [], "", None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            text += chunk.choices[0].text
    return {"prompt": prompt, "text": text, "tokens": usage.completion_tokens if usage else 0,
            "ttft": times[0] - start if times else None, "gaps": np.diff(times).tolist(), "end": time.perf_counter()}


def load_run(args, texts: list[str]) -> tuple[list[dict], float, str]:
    import openai
    from mindcpm.serve import spawn, stop
    proc, url = spawn(["--model", args.model, "--max-num-seqs", str(args.clients),
                       "--max-model-len", str(args.max_model_len), "--max-waiting", str(args.requests)])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(args.clients) as pool:
            # A first pass compiles the batch shapes this traffic needs (a prefill of however many
            # requests arrived together: many shapes), as offline_run's first call does for its own.
            list(pool.map(lambda p: one_request(client, model, p, args.max_tokens), texts))
            compiled = metric(urllib.request.urlopen(url + "/metrics", timeout=30).read().decode(),
                              "mindcpm:graph_compile_seconds")
            start = time.perf_counter()
            results = list(pool.map(lambda p: one_request(client, model, p, args.max_tokens), texts))
        wall = time.perf_counter() - start
        metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    finally:
        stop(proc)
    print(f"server: {metric(metrics, 'mindcpm:graph_compile_seconds') - compiled:.2f} s of graph compilation "
          f"during the measured run")
    return results, wall, metrics


def metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


def offline_run(args, texts: list[str]) -> tuple[list[str], float]:
    from mindcpm import LLM, SamplingParams
    llm = LLM(model=args.model, max_num_seqs=args.clients, max_model_len=args.max_model_len, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(texts, params)  # compile, as the server's warm-up pass does
    start = time.perf_counter()
    outs = llm.generate(texts, params)
    return [o.outputs[0].text for o in outs], time.perf_counter() - start


def pct(values, q) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> int:
    args = parse_args()
    texts = prompts(args.requests)
    results, wall, metrics = load_run(args, texts)
    offline_texts, offline_wall = offline_run(args, texts)

    problems = [f"request {i}: {r['tokens']} tokens" for i, r in enumerate(results) if r["tokens"] != args.max_tokens]
    problems += [f"request {i}: text differs from offline" for i, (r, t) in enumerate(zip(results, offline_texts))
                 if r["text"] != t]
    used = metric(metrics, "mindcpm:kv_cache_blocks_used")
    if used:
        problems.append(f"{used:.0f} blocks not free at the end")
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    served_tps, offline_tps = tokens / wall, args.requests * args.max_tokens / offline_wall
    print(f"{args.requests} requests, {args.clients} concurrent clients, {args.max_tokens} tokens each: "
          f"{len(problems)} problems")
    for line in problems[:10]:
        print("  " + line)
    print(f"TTFT p50 {pct(ttft, 50):.1f} ms, p99 {pct(ttft, 99):.1f} ms; "
          f"ITL p50 {pct(gaps, 50):.1f} ms, p99 {pct(gaps, 99):.1f} ms")
    print(f"served {served_tps:.1f} tok/s ({tokens} tokens in {wall:.2f} s); offline LLM.generate "
          f"{offline_tps:.1f} tok/s ({offline_wall:.2f} s); ratio {served_tps / offline_tps:.2f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
