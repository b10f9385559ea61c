"""mindcpm: MiniCPM4 (and Llama-architecture) inference on MindSpore, CPU and Ascend."""
from .sampling import SamplingParams
from .llm import LLM, CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
