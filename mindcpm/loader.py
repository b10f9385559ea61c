"""Checkpoint -> parameters: the one table that maps Hugging Face names to ours, and the checks
that turn a bad checkpoint into a one-line error naming the file and tensor."""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from tqdm import tqdm

from .parallel import Shard

# Checkpoint projection -> (our fused parameter, part index within it).
FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# MoE experts (MiniMax, docs/minimax.md#weight-names): experts.{e}.{w} -> (our stacked parameter, part within an expert).
EXPERT_PARTS = {
    "w1": ("w13", 0),  # gate
    "w3": ("w13", 1),  # up
    "w2": ("w2", 0),  # down
}
# Present in some tied checkpoints; the embedding serves as the head.
TIED_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint's files or tensors cannot be used; the message names which."""


INDEX = "model.safetensors.index.json"


def checkpoint_files(path: str) -> dict[str, set[str] | None]:
    """Checkpoint file -> the tensor names its index places in it (None: a single-file checkpoint)."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        shards: dict[str, set[str]] = {}
        for name, shard in _weight_map(index).items():
            shards.setdefault(os.path.join(path, shard), set()).add(name)
        for f in shards:
            if not os.path.isfile(f):
                raise CheckpointError(f"{index} names {os.path.basename(f)}, which is missing")
        return dict(sorted(shards.items()))
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return {single: None}
    raise CheckpointError(f"no model.safetensors or {INDEX} in {path}")


def _weight_map(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CheckpointError(f"{index}: no weight_map from tensor names to shard files")
    return weight_map


def our_name(hf_name: str) -> tuple[str, int | tuple | None]:
    """Maps a checkpoint tensor name to (parameter name, part or None); a part is an index into a
    fused projection, or (expert, index) into stacked experts."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    parts = name.split(".")
    if len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit() and parts[-2] in EXPERT_PARTS:
        stacked, part = EXPERT_PARTS[parts[-2]]
        return ".".join(parts[:-3] + [stacked, parts[-1]]), (int(parts[-3]), part)
    if len(parts) >= 2 and parts[-2] in FUSED_PARTS:
        fused, part = FUSED_PARTS[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), part
    return name, None


def load_checkpoint(model: nn.Cell, path: str, dtype=ms.float32, progress: bool = True,
                    skip: tuple[str, ...] = ()) -> None:
    """Fills the model's weights from the checkpoint at `path`. Each parameter keeps the dtype its
    layer created it with (`dtype` is the model's and no longer needed; kept for callers).
    skip: parameter and checkpoint tensor names neither loaded nor expected (a draft head's
    parameters shared with its target, tensors it never reads)."""
    params = {name: p for name, p in loadable_parameters(model).items() if name not in skip}
    cells = fused_cells(model)
    owners = sharded_cells(model)
    expected = {name: _parts(cells[name]) if name in cells else {None} for name in params}
    filled: dict[str, set] = {name: set() for name in params}
    # A parameter is staged in fp32 from its first tensor until its last part arrives, then handed
    # over: peak memory is the model plus the parameter being assembled, not a second copy of the
    # model in fp32 (which alone would not fit for an 8B checkpoint kept in bf16). The tensors are
    # read in parameter order, across every shard at once, so that a fused parameter whose parts
    # sit in different shards is not held while whole shards are read.
    staged: dict[str, np.ndarray] = {}
    prequantized = load_prequantized(path, params) | load_gptq(path, params)
    for name in prequantized:
        filled[name] = expected[name]
    with contextlib.ExitStack() as shards:
        tensors = []  # (checkpoint name, its file, the file's open handle)
        releases = {}  # file -> drops its read pages
        for file, indexed in checkpoint_files(path).items():
            handle = shards.enter_context(_open(file, indexed))
            releases[file] = read_pages_release([file])
            tensors += [(key, file, handle) for key in handle.keys()
                        if our_name(key)[0] not in prequantized and not gptq_tensor(key) and key not in skip]
        tensors.sort(key=lambda t: our_name(t[0])[0])
        for hf_name, file, handle in tqdm(tensors, desc="loading weights", unit="tensor", disable=not progress,
                                          leave=False):
            # A lazy slice: each tensor-parallel rank reads only the part it holds.
            tensor = _PagesDropped(handle.get_slice(hf_name), releases[file])
            name = _place(hf_name, tensor, file, params, cells, owners, staged, filled)
            if name is not None and filled[name] == expected[name]:
                _hand_over(params[name], staged.pop(name, None), name)
                if hasattr(params[name], "load_quantized"):
                    return_freed_heap()
    for name, parts in filled.items():
        if parts != expected[name]:
            raise CheckpointError(f"{path}: missing tensor for parameter {name}")


def read_pages_release(files):
    """A function that drops this process's resident pages of the checkpoint files' memory maps
    (safetensors reads through mmap, and every page read stays resident until the file is
    closed): called after each read, so a model quantized on load holds no more than one slab of
    the float checkpoint next to its codes (a float model: no second copy of the tensor it stages;
    measured with the test model of tests/quant/test_memory.py: the peak of loading 6 MiB lower
    than when the pages were dropped after each whole tensor). Clean file pages: a later read faults
    them in again from the page cache. The files must be open (mapped) already. Linux only;
    elsewhere it does nothing."""
    if not os.path.exists("/proc/self/maps"):
        return lambda: None
    import ctypes
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    wanted = {os.path.realpath(f) for f in files}
    ranges = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() in wanted and "w" not in fields[1]:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((start, end - start))

    def release() -> None:
        for start, length in ranges:
            madvise(start, length, 4)  # MADV_DONTNEED
    return release


class _PagesDropped:
    """A checkpoint tensor (a safetensors slice) whose file's read pages are dropped after every read."""

    def __init__(self, tensor, release):
        self.tensor, self.release = tensor, release

    def get_shape(self):
        return self.tensor.get_shape()

    def __getitem__(self, index) -> np.ndarray:
        values = self.tensor[index]
        self.release()
        return values


def return_freed_heap() -> None:
    """Hands the heap memory that glibc keeps after free() back to the system (malloc_trim): the
    slab temporaries of quantize-on-load, freed between the packed codes that stay, otherwise stay
    resident as holes in the heap (measured with tests/quant/test_memory.py's model: 18 MiB once
    loaded, 7 MiB at the peak of loading). Elsewhere than glibc it does nothing."""
    import ctypes
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _quant_slots(params: dict) -> dict:
    return {name: p for name, p in params.items() if hasattr(p, "load_quantized")}


def _fill_slots(slots: dict, parts: dict) -> set[str]:
    """Each slot takes its parts (a fused projection's, in order) stacked along the outputs."""
    from .quant.formats import concat_rows
    for name, weights in parts.items():
        slots[name].load_quantized(concat_rows([weights[i] for i in sorted(weights)], name))
    return set(parts)


GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def load_gptq(path: str, params: dict) -> set[str]:
    """Fills quantized layers from a GPTQ checkpoint's qweight / qzeros / scales / g_idx (the
    settings from quant/gptq.read_config), each rank with its shard of the unpacked codes;
    returns the names of the parameters filled."""
    from .quant import gptq
    slots = _quant_slots(params)
    config = gptq.read_config(path) if slots else None
    if config is None:
        return set()
    parts: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        for file, indexed in checkpoint_files(path).items():
            handle = stack.enter_context(_open(file, indexed))
            keys = set(handle.keys())
            for key in sorted(k for k in keys if k.endswith(".qweight")):
                base = key[: -len(".qweight")]
                name, part = our_name(base + ".weight")
                if name not in slots:
                    raise CheckpointError(f"{file}: unexpected tensor {key}")
                found = [handle.get_tensor(f"{base}.{t}") if f"{base}.{t}" in keys else None for t in GPTQ_TENSORS]
                if found[1] is None or found[2] is None:
                    raise CheckpointError(f"{file}: {base} has a qweight but no qzeros or scales in the same file")
                parts.setdefault(name, {})[part or 0] = slots[name].rank_part(gptq.from_gptq(*found, config, base),
                                                                              part, base)
    return _fill_slots(slots, parts)


def gptq_tensor(hf_name: str) -> bool:
    """A tensor load_gptq reads, which the float loop skips."""
    return hf_name.rsplit(".", 1)[-1] in GPTQ_TENSORS and not hf_name.endswith(".weight")


def load_prequantized(path: str, params: dict) -> set[str]:
    """Fills quantized layers from the checkpoint's QUANTIZED_FILE (a GGUF file's own blocks, see
    gguf.py), if it has one and the model keeps its projections quantized, each rank with its
    shard of the blocks; returns the names of the parameters filled, whose float tensors are then
    skipped."""
    from .gguf import QUANTIZED_FILE
    file = os.path.join(path, QUANTIZED_FILE)
    slots = _quant_slots(params)
    if not slots or not os.path.isfile(file):
        return set()
    from .quant.formats import QuantWeight
    parts: dict[str, dict] = {}
    with _open(file, None) as handle:
        keys = set(handle.keys())
        for key in sorted(k for k in keys if k.endswith(".packed")):
            hf_name = key[: -len(".packed")]
            name, part = our_name(hf_name)
            if name not in slots:
                raise CheckpointError(f"{file}: unexpected quantized tensor {hf_name}")
            packed, scales = handle.get_tensor(key), handle.get_tensor(f"{hf_name}.scales")
            offsets = handle.get_tensor(f"{hf_name}.offsets") if f"{hf_name}.offsets" in keys else None
            k = slots[name].full_shape(part)[1]  # all ranks' inputs: the file holds whole tensors
            whole = QuantWeight(packed, scales, offsets, packed.shape[1] * 8 // k, k // scales.shape[1], "float16")
            parts.setdefault(name, {})[part or 0] = slots[name].rank_part(whole, part, hf_name)
    return _fill_slots(slots, parts)


def _hand_over(param, values: np.ndarray | None, name: str) -> None:
    """Each parameter keeps the dtype its layer chose: 16-bit matrices beside fp32 norms on CPU,
    and fp32 for the few that stay fp32 whatever the model (MoE router, lightning norm). None:
    this rank received none of its parts' values (zeros)."""
    if values is None:
        values = np.zeros(param.shape, np.float32)
    if isinstance(values, dict):  # a quantized layer's parts (_quantized_rows), in order
        _fill_slots({name: param}, {name: _padded(values, param, name)})
        return
    _assign(param, values, name)


def _padded(parts: dict, slot, name: str) -> dict:
    """A quantized layer's parts, with zero rows after them where no tensor fills its last rows
    (a vocab-parallel head's padding on the last rank)."""
    missing = slot.shape[0] - sum(p.shape[0] for p in parts.values())
    if missing > 0:
        parts = dict(parts)
        parts[max(parts) + 1] = slot.device.quantize(np.zeros((missing, slot.shape[1]), np.float32), name)
    return parts


def _assign(param, values: np.ndarray, name: str) -> None:
    """A parameter takes its values; a quantized layer's slot quantizes them first."""
    if hasattr(param, "load_float"):
        param.load_float(values, name)
    else:
        param.set_data(Tensor(values, param.dtype))


def load_dummy_weights(model: nn.Cell, seed: int = 0) -> None:
    """Random weights in place of a checkpoint (vLLM's load_format="dummy"), for benchmarks:
    matrices ~ N(0, 0.02^2), norm weights stay 1, so activations stay finite and of the usual
    size. One parameter at a time, so peak memory is the model plus one tensor. Each parameter
    keeps its own dtype (16-bit matrices, fp32 routers)."""
    rng = np.random.default_rng(seed)
    for name, p in loadable_parameters(model).items():
        if len(p.shape) >= 2:
            values = rng.standard_normal(p.shape, dtype=np.float32)
            values *= np.float32(0.02)
            _assign(p, values, name)


def loadable_parameters(model: nn.Cell) -> dict:
    """Weights that come from the checkpoint (caches and RoPE tables do not). A quantized layer's
    checkpoint weight goes to its QuantSlot (layers/linear.py), under the name the float weight
    would have: the one place checkpoint names meet quantized parameters."""
    params = {name: p for name, p in model.parameters_and_names() if name.endswith(".weight")}
    params.update({f"{name}.weight": cell.quant for name, cell in model.cells_and_names()
                   if getattr(cell, "quantized", False)})
    return params


def sharded_cells(model: nn.Cell) -> dict:
    """Parameter name -> the cell that says which slice of the checkpoint tensor it holds."""
    return {f"{name}.weight": cell for name, cell in model.cells_and_names() if hasattr(cell, "checkpoint_shard")}


def fused_cells(model: nn.Cell) -> dict:
    return {f"{name}.weight": cell for name, cell in model.cells_and_names()
            if len(getattr(cell, "output_sizes", ())) > 1 or hasattr(cell, "loader_parts")}


def _parts(cell) -> set:
    """The parts the checkpoint must fill: stacked experts name theirs, a fused projection's are 0..n-1."""
    return cell.loader_parts() if hasattr(cell, "loader_parts") else set(range(len(cell.output_sizes)))


def _open(file: str, indexed: set[str] | None):
    """The open safetensors file, checked to hold `indexed` (the names the index places in it).
    bf16 tensors come back as numpy arrays of the bfloat16 type MindSpore registers with numpy
    when it is imported (numpy has none of its own)."""
    from safetensors import SafetensorError, safe_open
    try:
        handle = safe_open(file, framework="np")
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    absent = sorted((indexed or set()) - set(handle.keys()))
    if absent:
        raise CheckpointError(f"{file} has no tensor {absent[0]}, which {INDEX} places in it")
    return handle


def _whole(cell, part, shape: tuple) -> Shard:
    """A parameter of `shape` that holds the whole checkpoint tensor (at its part's rows, if fused)."""
    if part is None:
        return Shard(tuple(shape), (), ())
    rows = cell.part_rows(part)
    return Shard((rows.stop - rows.start,) + tuple(shape[1:]), (), (rows,))


def _place(hf_name, tensor, file, params, cells, owners, staged, filled) -> str | None:
    """Copies one checkpoint tensor (this rank's slice of it) into its parameter's staging
    buffer; returns the parameter's name (None for a tensor that is skipped)."""
    name, part = our_name(hf_name)
    if name not in params:
        if name == TIED_HEAD or hf_name.endswith("rotary_emb.inv_freq"):
            return None
        raise CheckpointError(f"{file}: unexpected tensor {hf_name}")
    if part is not None and (name not in cells or part not in _parts(cells[name])):
        raise CheckpointError(f"{file}: unexpected tensor {hf_name}")
    if part in filled[name]:
        raise CheckpointError(f"{file}: tensor {hf_name} appears twice")
    shard = owners[name].checkpoint_shard(part) if name in owners else \
        _whole(cells.get(name), part, params[name].shape)
    if shard is None:  # another rank's expert
        filled[name].add(part)
        return name
    shape = tuple(tensor.get_shape())
    if shape != tuple(shard.full_shape):
        raise CheckpointError(f"{file}: tensor {hf_name} has shape {shape}, expected {tuple(shard.full_shape)}")
    def read(index) -> np.ndarray:
        from safetensors import SafetensorError
        try:
            return tensor[index].astype(np.float32, copy=False)
        except (SafetensorError, ValueError, TypeError, OSError) as e:  # a truncated file can fail only when read
            raise CheckpointError(f"{file}: cannot read tensor {hf_name} ({e})") from None

    if hasattr(params[name], "load_quantized"):
        staged.setdefault(name, {})[part or 0] = _quantized_rows(read, shard, params[name], hf_name)
    else:
        # Zeros: a vocab-parallel table's padding rows on the last rank come from no tensor.
        target = staged.setdefault(name, np.zeros(params[name].shape, dtype=np.float32))
        target[shard.dest] = read(shard.source)
    filled[name].add(part)
    return name


QUANT_ROWS = 256  # rows of a checkpoint tensor read and quantized at once


def _quantized_rows(read, shard: Shard, slot, hf_name: str):
    """This rank's slice of a checkpoint tensor (read(index): its values at index, fp32) quantized
    QUANT_ROWS rows at a time (quantization is row by row): a quantized layer never holds its
    float weight, not even one part of it."""
    from .quant.formats import concat_rows
    source = tuple(shard.source) or (slice(None),)
    start, stop, _ = source[0].indices(shard.full_shape[0])
    pieces = [slot.device.quantize(read((slice(r, min(stop, r + QUANT_ROWS)),) + source[1:]), hf_name)
              for r in range(start, stop, QUANT_ROWS)]
    return concat_rows(pieces, hf_name)
