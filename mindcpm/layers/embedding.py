from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..ops.device import Device
from ..parallel import Shard, tp_group, vocab_rows
from .linear import QuantSlot
from .params import zeros_parameter


class Embedding(nn.Cell):
    """table[ids] * scale (MiniCPM's μP embedding scale; 1 for Llama).

    Tensor parallel: each rank holds a slice of the vocabulary; ids outside it give zeros and
    the ranks' rows are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype=ms.float32, scale: float = 1.0,
                 device: Device | None = None):
        super().__init__()
        device = device or Device()
        self.full_shape = (vocab_size, hidden_size)
        self.rows = vocab_rows(vocab_size)
        local = -(-vocab_size // tp_group().size)
        self.weight = zeros_parameter((local, hidden_size), device.stored_dtype(dtype), "weight")
        self.lookup = device.embedding(scale)
        self.all_reduce = ops.AllReduce() if tp_group().size > 1 else None

    def construct(self, ids):
        if self.all_reduce is None:
            return self.lookup(ids, self.weight)
        local = ids - self.rows.start
        inside = ops.logical_and(local >= 0, local < self.rows.stop - self.rows.start)
        h = self.lookup(ops.where(inside, local, 0), self.weight)
        return self.all_reduce(h * inside.astype(h.dtype).expand_dims(-1))

    def checkpoint_shard(self, part: int | None) -> Shard:
        return Shard(self.full_shape, (self.rows, slice(None)), (slice(0, self.rows.stop - self.rows.start),))


class LMHead(nn.Cell):
    """logits = h W^T in fp32; W is the embedding's when the checkpoint ties them. Tensor
    parallel: each rank scores its vocabulary slice and the slices are gathered.

    Quantized on load (Device.quantizes_head) the head keeps its own quantized weight: decode
    streams the head every token, and a 73k-word fp32 head is as many bytes as all the int8
    layers of MiniCPM4-0.5B. A tied head quantizes the embedding's values after loading
    (quantize_tied, from Device.after_load); the embedding itself stays float for the lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: Embedding | None, dtype=ms.float32,
                 device: Device | None = None):
        super().__init__()
        device = device or Device()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        self.quant_head = device.quantizes_head(vocab_size)
        self.quantized = self.quant_head and not self.tied  # the loader fills it from lm_head.weight
        local = -(-vocab_size // tp_group().size)
        if self.tied:
            self.embedding = tied_to
        else:
            self.full_shape = (vocab_size, hidden_size)
            self.rows = vocab_rows(vocab_size)
            if not self.quant_head:
                self.weight = zeros_parameter((local, hidden_size), device.stored_dtype(dtype), "weight")
        if self.quant_head:
            self.in_features = hidden_size
            self.quant = QuantSlot(self, device, (local, hidden_size))
            # Only the step's arg-max and outputs read its logits, unless the ranks' slices are
            # gathered: then it waits as any op.
            self.matmul = device.quant_matmul("plain", returns_early=tp_group().size == 1)
        else:
            self.matmul = device.matmul()
        self.tp_size = tp_group().size
        self.all_gather = ops.AllGather() if self.tp_size > 1 else None

    def quantize_tied(self) -> None:
        """A quantized tied head takes the embedding's values, quantized (after loading)."""
        if self.tied and self.quant_head:
            w = self.embedding.weight
            values = (w.astype(ms.float32) if w.dtype != ms.float32 else w).asnumpy()
            self.quant.load_float(values, "lm_head (the tied embedding)")

    def construct(self, h):
        if self.quant_head:
            logits = self.matmul(h, self.weight_packed, self.weight_scales, self.weight_offsets)
        else:
            logits = self.matmul(h, self.embedding.weight if self.tied else self.weight).astype(ms.float32)
        if self.all_gather is None:
            return logits
        n, local = logits.shape
        # AllGather stacks the ranks' [n, local] blocks along rows; put them side by side.
        logits = self.all_gather(logits).reshape(self.tp_size, n, local).transpose(1, 0, 2)
        return logits.reshape(n, self.tp_size * local)[:, : self.vocab_size]

    checkpoint_shard = Embedding.checkpoint_shard
