"""The loader's refusals: each broken checkpoint is one error naming what is wrong (the CLI's
line and exit status for them are tests/test_cli.py's).

The loader's memory: a checkpoint is staged a parameter at a time, never as a second copy of
the whole model (an 8B checkpoint kept in bf16 would not fit beside its own fp32 copy); also
for a sharded bf16 checkpoint, whose q, k and v of a layer sit in different files."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from tests.tiny import TINY_LLAMA, broken_copies, make_llm, make_tiny_model  # noqa: E402

DEEP = {**TINY_LLAMA, "num_hidden_layers": 8}
BROKEN = [  # (how the checkpoint is broken, what the error must name)
    ("no_config", ["no config.json"]),
    ("bad_arch", ["unsupported architecture GPT2LMHeadModel", "MiniCPMForCausalLM, LlamaForCausalLM"]),
    ("truncated", ["model.safetensors", "truncated"]),
    ("wrong_shape", ["model.norm.weight", "shape (63,)", "(64,)"]),
    ("missing_tensor", ["missing tensor", "layers.1.mlp.down_proj"]),
    ("unexpected_tensor", ["unexpected tensor model.layers.0.extra.weight"]),
]


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict:
    good = make_tiny_model(str(tmp_path_factory.mktemp("good")))
    return broken_copies(good, str(tmp_path_factory.mktemp("broken")))


@pytest.mark.parametrize("case, needles", BROKEN, ids=[case for case, _ in BROKEN])
def test_broken_checkpoint_is_one_error_naming_the_problem(broken, case, needles):
    from mindcpm.config import ConfigError
    from mindcpm.loader import CheckpointError
    with pytest.raises((ConfigError, CheckpointError)) as error:
        make_llm(broken[case])
    for needle in needles:
        assert needle in str(error.value), error.value
    assert "\n" not in str(error.value).strip(), error.value


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("deep")), DEEP, seed=3)


@pytest.fixture(params=["float32", "bfloat16-sharded"])
def checkpoint(request, deep_model_dir, tmp_path):
    """(directory, the exact fp32 value of each stored tensor)."""
    from safetensors.numpy import load_file
    from tests.test_loader_16bit import write_checkpoint
    if request.param == "float32":
        return deep_model_dir, load_file(f"{deep_model_dir}/model.safetensors")
    path = str(tmp_path / "bf16")
    return path, write_checkpoint(deep_model_dir, path, "bfloat16", shards=3)


def test_loading_bar_shows_how_many_tensors_there_are(deep_model_dir, capsys):
    """The progress bar counts the checkpoint's tensors against their total (it used to read
    '0tensor [00:00, ?tensor/s]', with no total)."""
    from safetensors import safe_open
    from mindcpm.config import ModelConfig
    from mindcpm.loader import load_checkpoint
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device
    with safe_open(f"{deep_model_dir}/model.safetensors", "np") as f:
        total = len(list(f.keys()))
    model = MiniCPMForCausalLM(ModelConfig.from_dir(deep_model_dir), Device(block_size=4, cache_blocks=2))
    load_checkpoint(model, deep_model_dir, ms.float32, progress=True)
    assert f"loading weights:   0%|          | 0/{total} " in capsys.readouterr().err


def test_checkpoint_staged_one_parameter_at_a_time(checkpoint):
    from mindcpm.config import ModelConfig
    from mindcpm.loader import load_checkpoint, loadable_parameters, our_name
    from mindcpm.models.minicpm import MiniCPMForCausalLM
    from mindcpm.ops import Device

    path, tensors = checkpoint
    cfg = ModelConfig.from_dir(path)
    model = MiniCPMForCausalLM(cfg, Device(block_size=4, cache_blocks=2))
    params = loadable_parameters(model)
    total = sum(int(np.prod(p.shape)) * 4 for p in params.values())
    largest = max(int(np.prod(p.shape)) * 4 for p in params.values())
    # A first load imports what the loader imports lazily (traced Python objects, ~2 MB, more than
    # this model's weights): only the second load is measured, so the test means the same alone
    # as after other tests.
    load_checkpoint(model, path, ms.float32, progress=False)
    tracemalloc.start()
    load_checkpoint(model, path, ms.float32, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # numpy's buffers are traced (MindSpore's own are not): the staging of a parameter or two,
    # a tensor read from the file and its fp32 copy, far below the model's fp32 size (which the
    # staging of every parameter at once would exceed). 8 layers: the largest is ~5% of the total.
    assert largest < total / 16
    assert peak < total / 2, (peak, largest, total)
    # and every parameter got its checkpoint values
    for hf_name, value in tensors.items():
        name, part = our_name(hf_name)
        got = params[name].asnumpy()
        if part is not None:
            got = got[_part_rows(model, name, part)]
        np.testing.assert_array_equal(got, value)


def _part_rows(model, param_name: str, part: int):
    cell = dict(model.cells_and_names())[param_name.rsplit(".", 1)[0]]
    return cell.part_rows(part)


def test_loader_names_and_clear_errors(tmp_path):
    """HF names (docs/minimax.md#weight-names) fill the stacked experts and fp32 router; bad expert tensors get the
    loader's one-line errors."""
    import mindspore as ms
    from safetensors.numpy import save_file
    from mindcpm.config import ModelConfig
    from mindcpm.loader import CheckpointError, load_checkpoint
    from mindcpm.models.minimax import MiniMaxForCausalLM
    from mindcpm.ops import Device
    from tests.tiny_minimax import make_tiny_minimax, minimax_config, random_weights
    cfg = minimax_config(hidden=32, heads=2, head_dim=16, kv_heads=1, attn_types=(0, 1), intermediate=8)
    path = make_tiny_minimax(str(tmp_path / "ok"), cfg)
    mc = ModelConfig.from_dir(path)

    def model(dtype=ms.float32):
        return MiniMaxForCausalLM(mc, Device(dtype=dtype, block_size=8, cache_blocks=3), 2)
    m = model(ms.float16)
    load_checkpoint(m, path, ms.float16, progress=False)
    weights = random_weights(cfg)
    moe = m.layers[0].block_sparse_moe
    assert moe.gate.weight.dtype == ms.float32 and moe.experts.w13.weight.dtype == ms.float16
    np.testing.assert_array_equal(moe.gate.weight.asnumpy(), weights["model.layers.0.block_sparse_moe.gate.weight"])
    p = "model.layers.0.block_sparse_moe.experts.3."
    np.testing.assert_array_equal(moe.experts.w13.weight.asnumpy()[3], np.concatenate(
        [weights[p + "w1.weight"], weights[p + "w3.weight"]]).astype(np.float16))
    np.testing.assert_array_equal(moe.experts.w2.weight.asnumpy()[3], weights[p + "w2.weight"].astype(np.float16))
    for name, change, message in (
            ("extra", {"model.layers.0.block_sparse_moe.experts.9.w1.weight": np.zeros((8, 32), np.float32)},
             "unexpected tensor model.layers.0.block_sparse_moe.experts.9.w1.weight"),
            ("missing", {p + "w3.weight": None}, "missing tensor for parameter layers.0.block_sparse_moe.experts.w13.weight"),
            ("shape", {p + "w2.weight": np.zeros((32, 9), np.float32)}, r"has shape \(32, 9\), expected \(32, 8\)")):
        bad = {k: v for k, v in weights.items()}
        for k, v in change.items():
            bad.pop(k, None)
            if v is not None:
                bad[k] = v
        d = tmp_path / name
        d.mkdir()
        save_file(bad, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(model(), str(d), progress=False)
