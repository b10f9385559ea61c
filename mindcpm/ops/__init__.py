"""The one place that knows the device: runtime set-up and the choice of attention backend."""
from __future__ import annotations

import os

import mindspore as ms

from .native import NativeAttention

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
