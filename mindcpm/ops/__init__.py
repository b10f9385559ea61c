"""Device-specific ops. mindcpm.ops.device.Device is the one place that chooses them."""
from .device import Device, detect_device, setup_runtime

__all__ = ["Device", "detect_device", "setup_runtime"]
