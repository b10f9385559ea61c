"""Run under msrun by tests/test_parallel.py: one tensor-parallel rank.

    python tests/tp_worker.py MODEL_DIR OUT_NPZ TP [MODEL_DIR_OF_RANK_1]
    python tests/tp_worker.py CASES_JSON OUT_NPZ TP

Rank 0 writes every prompt's all-position logits and the engine's greedy tokens to OUT_NPZ.
A fourth argument gives rank 1 another checkpoint (a rank whose shard is bad or missing).
CASES_JSON: {name: {"model": dir, LLM keyword: value, ...}}, each model built and run in turn in
this one launch (msrun costs seconds to start), its arrays under "name/" in OUT_NPZ."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindcpm import LLM, SamplingParams  # noqa: E402
from tests.engine_probe import prefill_logits  # noqa: E402
from tests.test_parallel import PROMPTS  # noqa: E402


def run_case(model_dir: str, tp: int, **options) -> dict[str, np.ndarray]:
    """Rank 0: the case's arrays; other ranks: {} once rank 0 is done with the model."""
    try:
        llm = LLM(model_dir, tensor_parallel_size=tp, max_model_len=128, max_num_seqs=4, progress=False,
                  kernels=os.environ.get("MINDCPM_TEST_KERNELS", "auto"),
                  enable_expert_parallel=os.environ.get("MINDCPM_TEST_EP") == "1", **options)
    except SystemExit as e:  # a rank other than 0 served rank 0's steps until it closed the model
        if e.code:
            raise
        return {}
    logits = prefill_logits(llm, PROMPTS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    llm.engine.runner.close()  # lets the other ranks go on to the next case
    arrays = {f"logits{i}": x for i, x in enumerate(logits)}
    arrays["tokens"] = np.array(json.dumps([o.outputs[0].token_ids for o in outputs]))
    arrays["quantization"] = np.array(str(llm.quantization))
    return arrays


def main() -> None:
    model_dir, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4 and os.environ.get("RANK_ID") == "1":
        model_dir = sys.argv[4]
    if not model_dir.endswith(".json"):
        arrays = run_case(model_dir, tp)
    else:
        with open(model_dir) as f:
            cases = json.load(f)
        arrays = {f"{name}/{key}": value for name, options in cases.items()
                  for key, value in run_case(options.pop("model"), tp, **options).items()}
    if arrays:
        np.savez(out, **arrays)


if __name__ == "__main__":
    main()
