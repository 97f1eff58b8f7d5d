"""Spreading a batch over the local devices (CPU host devices, GPUs, TPUs)."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import textwrap
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


# jax's accelerator builds, by the extra that installs them.
PLUGINS = {
    "cuda12": "jax-cuda12-plugin",
    "cuda13": "jax-cuda13-plugin",
    "tpu": "libtpu",
}


def installed_plugins() -> list[str]:
    """The extras (``cuda12``, ``cuda13``, ``tpu``) whose jax plugin is installed."""
    found = []
    for extra, package in PLUGINS.items():
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(extra)
    return found


def start_backends() -> list[str]:
    """Starts jax's backends; returns what jax logged about its plugins (one
    line each) instead of letting it print tracebacks: :func:`platform_warning`
    says it in one line."""
    problems = []

    class Keep(logging.Handler):
        def emit(self, record):
            error = record.exc_info[1] if record.exc_info else None
            line = str(error) if error is not None else record.getMessage()
            problems.append(line.strip().splitlines()[0] if line.strip() else line)

    jax_log = logging.getLogger("jax._src.xla_bridge")
    keep, propagate = Keep(logging.WARNING), jax_log.propagate
    jax_log.addHandler(keep)
    jax_log.propagate = False
    try:
        jax.devices()
    finally:
        jax_log.removeHandler(keep)
        jax_log.propagate = propagate
    return problems


def platform_line() -> str:
    """What jax runs on, e.g. ``platform: cpu, 2 devices (cpu:0, cpu:1)``."""
    devices = jax.devices()
    names = ", ".join(str(d) for d in devices[:4])
    more = ", ..." if len(devices) > 4 else ""
    return (
        f"platform: {jax.default_backend()}, {len(devices)} device"
        f"{'s' if len(devices) != 1 else ''} ({names}{more})"
    )


def platform_warning(problems=(), root: str = "/") -> str | None:
    """One line when jax runs on the CPU although an accelerator is there to
    use: an accelerator extra is installed (``problems``: what its plugin
    reported, from :func:`start_backends`), or an NVIDIA GPU or a TPU is
    visible without one. None when jax runs elsewhere, or when the user asked
    for the CPU with ``JAX_PLATFORMS``."""
    if jax.default_backend() != "cpu" or os.environ.get("JAX_PLATFORMS"):
        return None
    extras = installed_plugins()
    if extras:
        why = ""
        if problems:
            why = ": " + textwrap.shorten(problems[0], 160, placeholder=" ...")
        return (
            f"lpd: warning: the {'/'.join(extras)} extra is installed but jax runs on "
            f"the CPU{why} (check the device and its driver: NVIDIA >= 525 for "
            "cuda12, >= 580 for cuda13; JAX_PLATFORMS=cpu to use the CPU on purpose)"
        )
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
