from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


class Embedding(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((vocab_size, hidden_size)), dtype), name="weight",
                                requires_grad=False)

    def construct(self, ids):
        # gather, not nn.Embedding: the latter's op has no CPU kernel.
        return ops.gather(self.weight, ids, 0)


class LMHead(nn.Cell):
    """logits = h W^T in fp32; W is the embedding's when the checkpoint ties them."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: Embedding | None, dtype=ms.float32):
        super().__init__()
        self.tied = tied_to is not None
        if self.tied:
            self.embedding = tied_to
        else:
            self.weight = Parameter(Tensor(np.zeros((vocab_size, hidden_size)), dtype), name="weight",
                                    requires_grad=False)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, h):
        w = self.embedding.weight if self.tied else self.weight
        return self.matmul(h, w).astype(ms.float32)
