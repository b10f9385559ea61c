"""Run under msrun by tests/test_parallel.py: one tensor-parallel rank.

    python tests/tp_worker.py MODEL_DIR OUT_NPZ TP [MODEL_DIR_OF_RANK_1]

Rank 0 writes every prompt's all-position logits and the engine's greedy tokens to OUT_NPZ.
A fourth argument gives rank 1 another checkpoint (a rank whose shard is bad or missing)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindcpm import LLM, SamplingParams  # noqa: E402
from tests.engine_probe import prefill_logits  # noqa: E402
from tests.test_parallel import PROMPTS  # noqa: E402


def main() -> None:
    model_dir, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4 and os.environ.get("RANK_ID") == "1":
        model_dir = sys.argv[4]
    llm = LLM(model_dir, tensor_parallel_size=tp, max_model_len=128, max_num_seqs=4, progress=False,
              kernels=os.environ.get("MINDCPM_TEST_KERNELS", "auto"),
              enable_expert_parallel=os.environ.get("MINDCPM_TEST_EP") == "1")
    logits = prefill_logits(llm, PROMPTS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    arrays = {f"logits{i}": x for i, x in enumerate(logits)}
    arrays["tokens"] = np.array(json.dumps([o.outputs[0].token_ids for o in outputs]))
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
