"""The one linear layer every projection goes through, so a new weight format is one class."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops

from ..ops.device import Device
from ..parallel import Shard, even_rows, tp_group
from .params import zeros_parameter


class Linear(nn.Cell):
    """y = epilogue(x W^T) with W stored (out_features, in_features), no bias.

    `output_sizes` names the parts of a fused projection (q|k|v, gate|up); the loader fills
    each part from its own checkpoint tensor. The epilogue is "plain" or "swiglu" (the output is
    silu(gate) * up of a gate|up projection), so the device's op can fuse it.

    exact_dtype: the weight stays in `dtype` even where the model's matrices are stored in 16
    bits (a MoE router, which the spec keeps in fp32).

    Tensor parallel: "column" keeps this rank's rows of each part (`part_shards`, in the part's
    own row numbers; an even split by default), "row" keeps its columns and sums the partial
    products of all ranks.

    Quantized, a rank quantizes (or, from a GGUF / GPTQ checkpoint, cuts out) its own shard.
    Rows are quantized independently, so a column shard holds the same codes as those rows of
    the whole weight. A row shard must hold whole groups; per-channel int8 (one group a row)
    gets each shard's own scale per row, not the whole row's. A GPTQ act-order weight holds its
    inputs in group order (QuantWeight.input_perm): x is gathered into that order first, on the
    device, inside the compiled step; such a weight cannot be split by its inputs.

    device: where the op comes from (the default: MindSpore's own ops).
    """

    def __init__(self, in_features: int, output_sizes: list[int] | int, dtype=ms.float32,
                 epilogue: str = "plain", parallel: str | None = None, part_shards: list[slice] | None = None,
                 exact_dtype: bool = False, device: Device | None = None):
        super().__init__()
        device = device or Device()
        full_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.full_shapes = [(n, in_features) for n in full_sizes]
        self.part_shards = [slice(0, n) for n in full_sizes]
        self.in_shard = slice(0, in_features)
        if parallel == "column":
            self.part_shards = part_shards or [even_rows(n, "a projection's rows") for n in full_sizes]
        elif parallel == "row":
            self.in_shard = even_rows(in_features, "a projection's columns")
        elif parallel is not None:
            raise ValueError(f"unknown parallel style {parallel!r}")
        self.output_sizes = [s.stop - s.start for s in self.part_shards]
        self.in_features = self.in_shard.stop - self.in_shard.start
        shape = (sum(self.output_sizes), self.in_features)
        self.quantized = device.quantized(exact_dtype)
        if self.quantized and parallel == "row" and tp_group().size > 1:
            _check_row_shard(device, in_features, self.in_features)
        self.all_reduce = ops.AllReduce() if parallel == "row" and tp_group().size > 1 else None
        if self.quantized:
            self.quant = QuantSlot(self, device, shape)
            self.matmul = device.quant_matmul(epilogue)
            self.input_perm = None  # GPTQ act-order: set by QuantSlot.load_quantized
            return
        stored = dtype if exact_dtype else device.stored_dtype(dtype)
        self.weight = zeros_parameter(shape, stored, "weight")
        self.matmul = device.matmul(epilogue)

    def construct(self, x):
        if self.quantized:
            if self.input_perm is not None:  # a constant of the compiled graph: None or not
                x = ops.gather(x, self.input_perm, x.ndim - 1)
            y = self.matmul(x, self.weight_packed, self.weight_scales, self.weight_offsets)
        else:
            y = self.matmul(x, self.weight)
        return y if self.all_reduce is None else self.all_reduce(y)

    def part_rows(self, part: int) -> slice:
        start = sum(self.output_sizes[:part])
        return slice(start, start + self.output_sizes[part])

    def checkpoint_shard(self, part: int | None) -> Shard:
        part = part or 0
        return Shard(self.full_shapes[part], (self.part_shards[part], self.in_shard), (self.part_rows(part),))


def _check_row_shard(device: Device, full_inputs: int, inputs: int) -> None:
    """A row-parallel rank quantizes its share of the inputs on its own: one line when that share
    does not hold whole groups (the split is by tensor_parallel_size, not by the group)."""
    from ..quant.formats import QuantError
    try:
        device.quant_layout(inputs)
    except QuantError as e:
        raise QuantError(f"{e} (tensor_parallel_size {tp_group().size} gives each rank {inputs} of a "
                         f"row-parallel projection's {full_inputs} inputs)") from None


class QuantSlot:
    """Where the loader puts a quantized Linear's float weight: it has the weight's shape, and
    load_float() quantizes the values into the layer's weight_packed / weight_scales / weight_offsets
    (sized here, so a bad group size fails when the model is built, not when loaded). They are
    Parameters, or constants of the compiled graphs where the device says so
    (Device.quant_weights_constant)."""

    def __init__(self, layer: Linear, device: Device, shape: tuple[int, int]):
        self.shape, self.dtype, self.device = shape, ms.float32, device
        self._layer = layer
        self.constant = device.quant_weights_constant()
        for name, zeros in device.quant_parameters(*shape).items():
            setattr(layer, name, zeros if self.constant else Parameter(zeros, name=name, requires_grad=False))

    def load_float(self, values: np.ndarray, name: str = "weight") -> None:
        self.load_quantized(self.device.quantize(values, name))

    def full_shape(self, part: int | None) -> tuple[int, int]:
        """The checkpoint tensor's shape of part `part` (all ranks' shards together)."""
        return tuple(self._layer.checkpoint_shard(part).full_shape)

    def rank_part(self, qw, part: int | None, name: str):
        """This rank's shard of part `part`, from the checkpoint's whole QuantWeight (GGUF blocks,
        GPTQ): whole rows, and whole groups of inputs (QuantError naming `name` otherwise)."""
        shard = self._layer.checkpoint_shard(part)
        if qw.shape != tuple(shard.full_shape):
            raise ValueError(f"{name}: a quantized weight of shape {qw.shape}, expected {tuple(shard.full_shape)}")
        rows, inputs = (tuple(shard.source) + (slice(None), slice(None)))[:2]
        return qw.take_rows(rows).take_inputs(inputs, name)

    def load_quantized(self, qw) -> None:
        """Takes a QuantWeight of this shape in any layout the kernel runs (a GGUF file's own
        blocks may differ from the layout sized at build): tensors of another shape are replaced,
        before any graph is compiled."""
        if qw.shape != self.shape:
            raise ValueError(f"a quantized weight of shape {qw.shape} for a layer of shape {self.shape}")
        self._load_input_perm(qw.input_perm)
        for attr, values in zip(("weight_packed", "weight_scales", "weight_offsets"), self.device.quant_tensors(qw)):
            held = getattr(self._layer, attr)
            if self.constant:
                setattr(self._layer, attr, values)
            elif held.shape == values.shape and held.dtype == values.dtype:
                held.set_data(values)
            else:
                setattr(self._layer, attr, Parameter(values, name=held.name, requires_grad=False))

    def _load_input_perm(self, perm) -> None:
        """The order a GPTQ act-order weight reads its inputs in, as an int32 tensor (held like the
        weight) the layer gathers x with; None for a weight in the layer's own input order."""
        from ..quant.formats import QuantError
        if perm is None:
            if getattr(self._layer, "input_perm", None) is not None:
                self._layer.input_perm = None
            return
        if not hasattr(self._layer, "input_perm"):
            raise QuantError(f"{type(self._layer).__name__} takes no weight with permuted inputs (act-order)")
        if self.constant:
            self._layer.input_perm = ms.Tensor(np.asarray(perm, np.int32))
            return
        prefix = self._layer.weight_packed.name.rpartition(".")[0]
        self._layer.input_perm = Parameter(ms.Tensor(np.asarray(perm, np.int32)),
                                           name=f"{prefix}.input_perm" if prefix else "input_perm",
                                           requires_grad=False)
