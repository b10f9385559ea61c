"""Memory sized by the context served: the RoPE tables hold max_model_len positions, not the
model's window (MiniMax-M1: 10,240,000), and max_model_len defaults to the model's context only
when one sequence that long fits the KV-cache budget."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.tiny import write_byte_tokenizer
from tests.tiny_minimax import minimax_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M1_POSITIONS = 10_240_000
# Two layers (one lightning, one softmax), 2 KV heads of 16 dims in fp32: K and V of a token
# take 2 * 2 * 2 * 16 * 4 = 512 bytes.
KV_BYTES_PER_TOKEN = 512


@pytest.fixture(scope="module")
def m1_shaped(tmp_path_factory):
    """A tiny MiniMax-M1 whose config keeps M1's 10,240,000-position window (dummy weights)."""
    path = str(tmp_path_factory.mktemp("m1_window"))
    cfg = minimax_config(hidden=64, heads=4, head_dim=16, kv_heads=2, attn_types=(0, 1), experts=2, top_k=1,
                         intermediate=32, max_pos=M1_POSITIONS)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_byte_tokenizer(path)
    return path


def rope_table(llm):
    return next(p for name, p in llm.engine.runner.model.parameters_and_names() if name.endswith(".cos"))


PEAK_RSS_SCRIPT = """
import resource, sys
from mindcpm import LLM
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
llm = LLM(model=sys.argv[1], load_format="dummy", progress=False, max_model_len=4096, kv_cache_gib=0.01)
table = next(p for n, p in llm.engine.runner.model.parameters_and_names() if n.endswith(".cos"))
print(list(table.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_m1_window_with_max_model_len_allocates_no_table_of_the_window(m1_shaped):
    """In a fresh process (peak RSS is per process): a table of the full window alone would be
    10,240,000 x 8 x 4 bytes x 2 (cos, sin) = 655 MB, plus the temporaries computing it."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, m1_shaped], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, grown = proc.stdout.split("]")
    assert json.loads(shape + "]") == [4096, 8]
    assert int(grown) < 200 * 2**20, f"building the model grew the peak RSS by {int(grown) / 2**20:.0f} MiB"


def test_default_max_model_len_is_what_the_kv_budget_holds(m1_shaped, caplog):
    from mindcpm import LLM
    budget_gib = 2**-10  # 1 MiB: 2048 tokens of 512 bytes
    with caplog.at_level(logging.WARNING, logger="mindcpm"):
        llm = LLM(model=m1_shaped, load_format="dummy", progress=False, kv_cache_gib=budget_gib)
    expected = 2**20 // KV_BYTES_PER_TOKEN
    assert llm.max_model_len == expected and rope_table(llm).shape == (expected, 8)
    notices = [r.getMessage() for r in caplog.records if "max_model_len is" in r.getMessage()]
    assert len(notices) == 1 and f"context of {M1_POSITIONS} tokens" in notices[0]


def test_default_max_model_len_is_the_context_when_it_fits(tmp_path):
    from mindcpm import LLM
    from tests.tiny import TINY_LLAMA, make_tiny_model
    llm = LLM(model=make_tiny_model(str(tmp_path)), progress=False)
    assert llm.max_model_len == TINY_LLAMA["max_position_embeddings"]


def test_served_table_is_the_head_of_the_window_table():
    """LongRoPE picks its factors and scale by the model's window, not by the table's length."""
    from mindcpm.config import RopeConfig
    from mindcpm.layers.rotary import rope_tables
    rng = np.random.default_rng(0)
    short, long = tuple(rng.uniform(1, 2, 4).tolist()), tuple(rng.uniform(2, 8, 4).tolist())
    window = RopeConfig(8, 10000.0, 65536, short, long, 4096)
    served = RopeConfig(8, 10000.0, 65536, short, long, 4096, table_len=100)
    for full, head in zip(rope_tables(window), rope_tables(served)):
        assert head.shape == (100, 8) and np.array_equal(head, full[:100])
