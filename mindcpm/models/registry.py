"""Architecture name -> model class, and each class's checkpoint name table."""
from __future__ import annotations

from .minicpm import MiniCPMForCausalLM
from .minimax import MiniMaxForCausalLM

MODELS = {
    "MiniCPMForCausalLM": MiniCPMForCausalLM,
    "LlamaForCausalLM": MiniCPMForCausalLM,
    "MiniMaxM1ForCausalLM": MiniMaxForCausalLM,
    "MiniMaxText01ForCausalLM": MiniMaxForCausalLM,
    "MiniMaxForCausalLM": MiniMaxForCausalLM,
}


def model_class(architecture: str):
    return MODELS[architecture]
