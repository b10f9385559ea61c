"""The one place that knows the device: runtime set-up and the choice of attention backend."""
from __future__ import annotations

import os
from contextlib import contextmanager

import mindspore as ms

from .native import NativeAttention, NativeEmbedding, NativeMatmul, NativeRMSNorm, SplitRopeAttention

BACKENDS = ("native", "ascend")


def on_ascend() -> bool:
    try:
        return bool(ms.device_context.ascend.is_available())
    except (AttributeError, RuntimeError):
        return False


_device: str | None = None


def setup_runtime() -> str:
    """Select the device and its runtime options once per process; returns the device name."""
    global _device
    if _device is None:
        _device = "Ascend" if on_ascend() else "CPU"
        try:
            ms.set_device(_device)
        except RuntimeError:
            pass  # a kernel already ran on the default device (CPU), which is this one
        if _device == "CPU":
            # The asynchronous PyNative pipeline thrashes two cores; synchronous launches are
            # 10-20x faster and attribute errors to the op that raised them.
            ms.runtime.launch_blocking()
            # A compiled graph then runs on the calling thread instead of being handed to a
            # "frontend_queue" thread that busy-waits for the next graph: on two cores that
            # spinning thread competes with the host's work between steps (measured: 0.3-0.4 ms
            # less per decode step). Read when the first graph runs, so it must be set first.
            os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")
    return _device


def default_backend() -> str:
    return "ascend" if on_ascend() else "native"


def attention_backend(name: str | None = None):
    name = name or os.environ.get("MINDCPM_ATTENTION") or default_backend()
    if name == "native":
        return NativeAttention()
    if name == "ascend":
        from .ascend import AscendAttention
        return AscendAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


# -- the per-layer ops: MindSpore composites, or the CPU kernels of ops/cpu.py -----------------
# Layers ask for their ops here when they are built; the runner builds a model inside
# kernel_mode(...), so one process can hold models with and without kernels side by side.
_kernels = {"on": False, "weight_dtype": None}


@contextmanager
def kernel_mode(enabled: bool, weight_dtype=None):
    """Layers built inside use the CPU kernels (enabled) and store their matrices (linear,
    embedding) in weight_dtype (a 16-bit dtype, or None for the model's dtype)."""
    if weight_dtype is not None and not enabled:
        raise ValueError("16-bit weights with fp32 activations need the CPU kernels")
    saved = dict(_kernels)
    _kernels.update(on=enabled, weight_dtype=weight_dtype)
    try:
        yield
    finally:
        _kernels.update(saved)


def weight_dtype(dtype):
    """The dtype of a layer's matrix weights for a model of compute dtype `dtype`."""
    return _kernels["weight_dtype"] or dtype


def matmul(epilogue: str = "plain", scale: float = 1.0, norm_eps: float | None = None):
    """x W^T with an epilogue; with norm_eps, x is RMS-normalised first (fused where the device can)."""
    if _kernels["on"]:
        from .cpu import KernelMatmul
        return KernelMatmul(epilogue, scale, norm_eps)
    return NativeMatmul(epilogue, scale, norm_eps)


def swiglu_mlp(gate_up_matmul, down_matmul):
    """r + scale * down(silu(gate) * up)(rmsnorm(x)) as one op where the device has one, from the
    layer's two matmul ops: the CPU kernels, when gate|up applies the norm and down adds the
    residual (not when a sharded down reduces its partial sums first). Else None: the layer then
    composes its two projections."""
    from .cpu import KernelMatmul, KernelSwigluMlp
    if (isinstance(gate_up_matmul, KernelMatmul) and gate_up_matmul.norm is not None
            and isinstance(down_matmul, KernelMatmul) and down_matmul.epilogue == "residual"):
        return KernelSwigluMlp(gate_up_matmul, down_matmul)
    return None


def rms_norm(eps: float):
    if _kernels["on"]:
        from .cpu import KernelRMSNorm
        return KernelRMSNorm(eps)
    return NativeRMSNorm(eps)


def embedding(scale: float = 1.0):
    if _kernels["on"]:
        from .cpu import KernelEmbedding
        return KernelEmbedding(scale)
    return NativeEmbedding(scale)


def attention_core(backend, rotary, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
    """qkv [B, L, (Hq + 2 Hkv) D] -> attention output [B, L, Hq D] over the layer's paged cache.
    With the kernels on, the native backend's split + RoPE + attention is one fused kernel."""
    if _kernels["on"] and backend.name == "native":
        from .cpu import KernelAttention
        return KernelAttention(rotary, num_heads, num_kv_heads, head_dim, scale)
    return SplitRopeAttention(backend, rotary, num_heads, num_kv_heads, head_dim, scale)


def attention_block(qkv_matmul, attention, o_matmul):
    """r + scale * o_proj(attention(qkv_proj(rmsnorm(x)))) as one op where the device has one, from
    the layer's three ops: the CPU kernels with the native backend, when q|k|v applies the norm
    and o_proj adds the residual (not when a sharded o_proj reduces its partial sums first). Else
    None: the layer then composes them."""
    from .cpu import KernelAttention, KernelAttentionBlock, KernelMatmul
    if (isinstance(qkv_matmul, KernelMatmul) and qkv_matmul.norm is not None and isinstance(attention, KernelAttention)
            and isinstance(o_matmul, KernelMatmul) and o_matmul.epilogue == "residual"):
        return KernelAttentionBlock(qkv_matmul, attention, o_matmul)
    return None


def moe_backend(name: str | None = None):
    """The MoE backend that goes with attention backend `name` (one choice per device)."""
    name = name or os.environ.get("MINDCPM_ATTENTION") or default_backend()
    if name == "native":
        from .moe import NativeMoE
        return NativeMoE()
    if name == "ascend":
        from .ascend_moe import AscendMoE
        return AscendMoE()
    raise ValueError(f"unknown MoE backend {name!r}; choose one of {', '.join(BACKENDS)}")


def lightning_backend(name: str | None = None):
    """Lightning attention: the composite on every device for now (no fused kernel exists, spec §8)."""
    from .lightning import NativeLightning
    return NativeLightning()
