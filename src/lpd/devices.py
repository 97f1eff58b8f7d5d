"""Spreading a batch over the local devices (CPU host devices, GPUs, TPUs)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(batch_size: int) -> NamedSharding:
    """Shards a leading batch axis over as many local devices as divide it.

    With ``D`` local devices the batch is split over ``gcd(batch_size, D)`` of
    them, so any batch size works and a batch that divides evenly uses all.
    """
    devices = jax.local_devices()
    num = math.gcd(batch_size, len(devices))
    mesh = Mesh(np.asarray(devices[:num]), ("batch",))
    return NamedSharding(mesh, PartitionSpec("batch"))


# PCI device ids of Google's TPU chips (vendor 0x1ae0, which gVNIC shares).
_TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def visible_accelerator(root: str = "/") -> str | None:
    """``"gpu"`` or ``"tpu"`` when this host shows an NVIDIA GPU or a TPU to
    the operating system (device files, PCI ids), else None; ``root`` is for
    tests."""
    root = Path(root)
    if any((root / "dev" / name).exists() for name in ("nvidia0", "nvidiactl")):
        return "gpu"
    for vendor in root.glob("sys/bus/pci/devices/*/vendor"):
        device = vendor.with_name("device")
        if vendor.read_text().strip() == "0x1ae0" and device.exists():
            if device.read_text().strip() in _TPU_PCI_DEVICES:
                return "tpu"
    return None


def platform_line() -> str:
    """What jax runs on, e.g. ``platform: cpu, 2 devices (TFRT_CPU_0, ...)``."""
    devices = jax.devices()
    names = ", ".join(str(d) for d in devices[:4])
    more = ", ..." if len(devices) > 4 else ""
    return (
        f"platform: {jax.default_backend()}, {len(devices)} device"
        f"{'s' if len(devices) != 1 else ''} ({names}{more})"
    )


def accelerator_warning(root: str = "/") -> str | None:
    """One line when an NVIDIA GPU or a TPU is visible but jax runs on the CPU
    (and the user did not ask for the CPU with ``JAX_PLATFORMS``)."""
    if jax.default_backend() != "cpu" or os.environ.get("JAX_PLATFORMS"):
        return None
    found = visible_accelerator(root)
    if found is None:
        return None
    extra = {"gpu": "cuda12", "tpu": "tpu"}[found]
    what = {"gpu": "an NVIDIA GPU", "tpu": "a TPU"}[found]
    return (
        f"lpd: warning: {what} is visible but jax runs on the CPU; install the "
        f"`{extra}` extra (make setup ACCEL={extra}, or pip install 'lpd[{extra}]'"
        f"{'; cuda13 for NVIDIA drivers >= 580' if found == 'gpu' else ''})"
    )
