from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ..ops import embedding, matmul, weight_dtype


class Embedding(nn.Cell):
    """table[ids] * scale (MiniCPM's μP embedding scale; 1 for Llama)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype=ms.float32, scale: float = 1.0):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((vocab_size, hidden_size)), weight_dtype(dtype)), name="weight",
                                requires_grad=False)
        self.lookup = embedding(scale)

    def construct(self, ids):
        return self.lookup(ids, self.weight)


class LMHead(nn.Cell):
    """logits = h W^T in fp32; W is the embedding's when the checkpoint ties them."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: Embedding | None, dtype=ms.float32):
        super().__init__()
        self.tied = tied_to is not None
        if self.tied:
            self.embedding = tied_to
        else:
            self.weight = Parameter(Tensor(np.zeros((vocab_size, hidden_size)), weight_dtype(dtype)), name="weight",
                                    requires_grad=False)
        self.matmul = matmul()

    def construct(self, h):
        w = self.embedding.weight if self.tied else self.weight
        return self.matmul(h, w).astype(ms.float32)
