"""Checkpoint -> parameters: the one table that maps Hugging Face names to ours, and the checks
that turn a bad checkpoint into a one-line error naming the file and tensor."""
from __future__ import annotations

import json
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from tqdm import tqdm

# Checkpoint projection -> (our fused parameter, part index within it).
FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Present in some tied checkpoints; the embedding serves as the head.
TIED_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint's files or tensors cannot be used; the message names which."""


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {index}: {e}") from None
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"{index} names {os.path.basename(f)}, which is missing")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def our_name(hf_name: str) -> tuple[str, int | None]:
    """Maps a checkpoint tensor name to (parameter name, part index or None)."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED_PARTS:
        fused, part = FUSED_PARTS[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), part
    return name, None


def load_checkpoint(model: nn.Cell, path: str, dtype=ms.float32, progress: bool = True) -> None:
    params = loadable_parameters(model)
    cells = fused_cells(model)
    filled: dict[str, set] = {name: set() for name in params}
    staged = {name: np.empty(p.shape, dtype=np.float32) for name, p in params.items()}
    files = checkpoint_files(path)
    with tqdm(total=None, desc="loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for file in files:
            for hf_name, array in _read_tensors(file):
                _place(hf_name, array, file, params, cells, staged, filled)
                bar.update(1)
    for name, parts in filled.items():
        expected = set(range(len(cells[name].output_sizes))) if name in cells else {None}
        if parts != expected:
            raise CheckpointError(f"{path}: missing tensor for parameter {name}")
    for name, p in params.items():
        p.set_data(Tensor(staged.pop(name), dtype))


def load_dummy_weights(model: nn.Cell, dtype=ms.float32, seed: int = 0) -> None:
    """Random weights in place of a checkpoint (vLLM's load_format="dummy"), for benchmarks:
    matrices ~ N(0, 0.02^2), norm weights stay 1, so activations stay finite and of the usual
    size. One parameter at a time, so peak memory is the model plus one tensor."""
    rng = np.random.default_rng(seed)
    for p in loadable_parameters(model).values():
        if len(p.shape) >= 2:
            values = rng.standard_normal(p.shape, dtype=np.float32)
            values *= np.float32(0.02)
            p.set_data(Tensor(values, dtype))


def loadable_parameters(model: nn.Cell) -> dict:
    """Weights that come from the checkpoint (caches and RoPE tables do not)."""
    return {name: p for name, p in model.parameters_and_names() if name.endswith(".weight")}


def fused_cells(model: nn.Cell) -> dict:
    return {f"{name}.weight": cell for name, cell in model.cells_and_names()
            if len(getattr(cell, "output_sizes", ())) > 1}


def _read_tensors(file: str):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _place(hf_name, array, file, params, cells, staged, filled):
    name, part = our_name(hf_name)
    if name not in params:
        if name == TIED_HEAD or hf_name.endswith("rotary_emb.inv_freq"):
            return
        raise CheckpointError(f"{file}: unexpected tensor {hf_name}")
    if part is not None and name not in cells:
        raise CheckpointError(f"{file}: unexpected tensor {hf_name}")
    target = staged[name]
    rows = cells[name].part_rows(part) if part is not None else slice(None)
    expected = target[rows].shape
    if tuple(array.shape) != expected:
        raise CheckpointError(f"{file}: tensor {hf_name} has shape {tuple(array.shape)}, expected {expected}")
    target[rows] = array.astype(np.float32)
    filled[name].add(part)
