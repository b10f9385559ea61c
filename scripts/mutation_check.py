"""Mutation check of the test suite (not part of CI): flips one real condition at a time in a
temporary copy of the repository, runs the tests that should notice, and reports which test
caught each mutation, or that it survived (a gap in the suite).

    python scripts/mutation_check.py                 # every mutation
    python scripts/mutation_check.py --only sampler  # the mutations whose name contains "sampler"
    python scripts/mutation_check.py --list

Each mutation runs its own pytest session (one fresh kernel cache each, see tests/conftest.py),
stopping at the first failure; expect a few minutes per mutation on a 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str  # must occur exactly once in path
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions


SPARSE_CELL = ("tests/layers/test_sparse.py", "-k", "not cpu_kernel")  # the composite cell
SPARSE_KERNEL = ("tests/layers/test_sparse.py", "-k", "cpu_kernel")  # the C++ kernels (built once)
MINIMAX_VARIANTS = ("tests/models/test_minimax.py", "-k", "variants")

MUTATIONS = [
    Mutation("stop string: search window one character short", "mindcpm/engine/llm_engine.py",
             "len(piece) - state.stop_len + 1, 0)", "len(piece) - state.stop_len + 2, 0)",
             ("tests/engine/test_llm_engine.py", "-k", "stop")),
    Mutation("block table: a prefix hit may cover the whole prompt", "mindcpm/engine/block_manager.py",
             "for i in range((seq.num_tokens - 1) // self.block_size):",
             "for i in range(seq.num_tokens // self.block_size):",
             ("tests/engine/test_block_manager.py", "tests/engine/test_scheduler.py")),
    Mutation("block table: C2 entry stored one block early", "mindcpm/layers/sparse.py",
             "lambda e: 4 * e + 7)", "lambda e: 4 * e + 6)",
             SPARSE_CELL),
    Mutation("muP: residual scale over sqrt(layers + 1)", "mindcpm/config.py",
             'float(hf.get("scale_depth", 1.0)) / math.sqrt(layers)',
             'float(hf.get("scale_depth", 1.0)) / math.sqrt(layers + 1)',
             ("tests/test_config.py", "tests/models/test_minicpm.py", "-k", "mup or minicpm4")),
    Mutation("LongRoPE: long factors when max == original", "mindcpm/layers/rotary.py",
             "use_long = rope.max_position > rope.original_max_position",
             "use_long = rope.max_position >= rope.original_max_position",
             ("tests/layers/test_rotary.py",)),
    Mutation("sampler: top-k keeps k+1 tokens", "mindcpm/engine/sampler.py",
             "t_k = ops.where(col < top_k, cv, inf)", "t_k = ops.where(col <= top_k, cv, inf)",
             ("tests/engine/test_sampler.py",)),
    Mutation("sampler: min-p threshold a factor e too high", "mindcpm/engine/sampler.py",
             "thr = ops.where(greedy, m, m + log_min_p)", "thr = ops.where(greedy, m, m + log_min_p + 1.0)",
             ("tests/engine/test_sampler.py",)),
    Mutation("scheduler: EOS at the min_tokens-th token ignored", "mindcpm/engine/scheduler.py",
             "if seq.num_completion_tokens >= params.min_tokens and (",
             "if seq.num_completion_tokens > params.min_tokens and (",
             ("tests/engine/test_scheduler.py",)),
    Mutation("InfLLM-v2 pooling: kernel 4b+3 left out (composite)", "mindcpm/layers/sparse.py",
             "padded[..., 4: 4 * nb + 4].reshape(b, hkv, l, nb, 4)[..., 0])",
             "padded[..., 3: 4 * nb + 3].reshape(b, hkv, l, nb, 4)[..., 0])",
             SPARSE_CELL),
    Mutation("InfLLM-v2 pooling: kernel 4b+3 left out (CPU kernel)", "kernels_aclnn/infllm_score/cpu.cc",
             "j <= std::min(4 * blk + 3, N1 - 1)", "j <= std::min(4 * blk + 2, N1 - 1)",
             SPARSE_KERNEL),
    Mutation("InfLLM-v2: ties to the higher block (CPU kernel)", "kernels_aclnn/infllm_score/cpu.cc",
             "(pooled[a] == pooled[c] && a < c)", "(pooled[a] == pooled[c] && a > c)",
             SPARSE_KERNEL),
    Mutation("InfLLM-v2: dense up to and including dense_len", "mindcpm/layers/sparse.py",
             "dense = (lengths < self.cfg.dense_len)", "dense = (lengths <= self.cfg.dense_len)",
             SPARSE_CELL),
    Mutation("InfLLM-v2: no visible-C2 rule", "mindcpm/layers/sparse.py",
             "p = ops.where(ops.logical_and(vis1, any2), ops.exp(s1 - lse), 0.0)",
             "p = ops.where(vis1, ops.exp(s1 - lse), 0.0)",
             SPARSE_CELL),
    Mutation("lightning: query decay lambda^i instead of lambda^(i+1)", "mindcpm/ops/lightning.py",
             "inter = self.bmm(q * ops.exp(-cum).expand_dims(-1), state)",
             "inter = self.bmm(q * ops.exp(decay - cum).expand_dims(-1), state)",
             ("tests/layers/test_lightning.py", "-k", "block_form or chunked or layer_matches")),
    Mutation("lightning: slopes 2^(-8h/H) instead of 2^(-8(h+1)/H)", "mindcpm/layers/lightning.py",
             "return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)", "return 2.0 ** (-8.0 * np.arange(0, n) / n)",
             ("tests/layers/test_lightning.py", "-k", "slopes")),
    Mutation("MiniMax: shared expert weights swapped", "mindcpm/models/minimax.py",
             "m = m * (1 - c) + self.shared_mlp(h2) * c", "m = m * c + self.shared_mlp(h2) * (1 - c)",
             MINIMAX_VARIANTS),
    Mutation("MiniMax: postnorm flow whatever the flag", "mindcpm/models/minimax.py",
             "x1 = (h if self.postnorm else x) * self.attn_alpha", "x1 = h * self.attn_alpha",
             MINIMAX_VARIANTS),
]


def copy_repository(dest: str) -> None:
    """The working tree's tracked and new (not ignored) files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def apply(mutation: Mutation, repo: str) -> None:
    path = os.path.join(repo, mutation.path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"error: mutation {mutation.name!r}: the text occurs {count} times in {mutation.path}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(mutation.old, mutation.new))


def run(mutation: Mutation, timeout: int) -> tuple[str, float]:
    """('caught by <test>' | 'SURVIVED' | 'error: ...', seconds)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mindcpm-mutant-") as repo:
        copy_repository(repo)
        apply(mutation, repo)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests]
        try:
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"error: timed out after {timeout} s", time.monotonic() - start
    seconds = time.monotonic() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    if failed:
        return f"caught by {failed[0]}", seconds
    if proc.returncode == 0:
        return "SURVIVED", seconds
    return f"error: pytest exit {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}", seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mutation")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}\t{m.path}\t{' '.join(m.tests)}")
        return 0
    survived = 0  # or failed to run
    print("| mutation | file | result | s |\n|---|---|---|---|", flush=True)
    for m in chosen:
        result, seconds = run(m, args.timeout)
        survived += not result.startswith("caught")
        print(f"| {m.name} | {m.path} | {result} | {seconds:.0f} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
