"""BitCPM detection: with quantization unset, a checkpoint whose first projection is exactly
ternary per group runs as "bitcpm"; an ordinary float checkpoint, or one whose projections are only trivially
ternary (all zero), is not taken for one. Loading a detected checkpoint (logits against
transformers) and one whose later projection is not ternary (one error line naming it):
test_quantized_model.py's BitCPM tests."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("mindspore")
from safetensors.numpy import load_file, save_file  # noqa: E402

from mindcpm.llm import resolve_quantization  # noqa: E402
from mindcpm.quant.bitcpm import probe_checkpoint  # noqa: E402
from tests.quant.test_quantized_model import tiny_dir, write_ternary  # noqa: E402,F401 (fixture)

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def ternary_dir(tiny_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / "ternary")
    write_ternary(tiny_dir, out)
    return out


def test_ternary_checkpoint_is_probed_by_its_first_projection(ternary_dir):
    assert probe_checkpoint(ternary_dir) == (Q_PROJ, 32)
    assert resolve_quantization(None, ternary_dir, True) == "bitcpm"
    assert resolve_quantization(None, ternary_dir, True, detect=False) is None  # dummy weights
    assert resolve_quantization("int8", ternary_dir, True) == "int8"  # asked wins
    assert resolve_quantization("bitcpm", ternary_dir, True) == "bitcpm"


def test_float_checkpoint_is_not_bitcpm(tiny_dir, tmp_path):  # noqa: F811
    assert probe_checkpoint(tiny_dir) is None
    assert resolve_quantization(None, tiny_dir, True) is None
    # All zero is ternary under any group size, but no BitCPM projection is.
    out = str(tmp_path / "zeros")
    write_ternary(tiny_dir, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    tensors[Q_PROJ] = np.zeros_like(tensors[Q_PROJ])
    save_file(tensors, os.path.join(out, "model.safetensors"))
    assert probe_checkpoint(out) is None


def test_without_kernels_ternary_runs_float_with_a_notice(ternary_dir, caplog):
    with caplog.at_level("WARNING", "mindcpm"):
        assert resolve_quantization(None, ternary_dir, False) is None
    (notice,) = [r.getMessage() for r in caplog.records]
    assert "is ternary (BitCPM) but runs as float weights: the CPU kernels" in notice
    with pytest.raises(ValueError, match="quantization 'bitcpm' runs on the CPU kernels, which are off"):
        resolve_quantization("bitcpm", ternary_dir, False)

