"""Architecture name -> model class, and each class's checkpoint name table."""
from __future__ import annotations

from .minicpm import MiniCPMForCausalLM

MODELS = {
    "MiniCPMForCausalLM": MiniCPMForCausalLM,
    "LlamaForCausalLM": MiniCPMForCausalLM,
}


def model_class(architecture: str):
    return MODELS[architecture]
