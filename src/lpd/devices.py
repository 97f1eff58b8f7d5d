"""Where lpd runs: spreading a batch over the devices (CPU host devices, GPUs,
TPUs), on one host or on several (one process per host, JAX's multi-controller
runtime), and the accelerator checks."""

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

from lpd.errors import LpdError


def batch_sharding(batch_size: int) -> NamedSharding:
    """Shards a leading batch axis over as many devices as divide it.

    With ``D`` devices the batch is split over ``gcd(batch_size, D)`` of them,
    so any batch size works and a batch that divides evenly uses all. With
    several processes the batch must split over every process's devices.
    """
    devices = jax.devices()
    num = math.gcd(batch_size, len(devices))
    if jax.process_count() > 1 and num != len(devices):
        raise LpdError(
            f"a batch of {batch_size} does not split over the {len(devices)} "
            f"devices of {jax.process_count()} processes; make the config's batch "
            f"sizes multiples of {len(devices)}"
        )
    mesh = Mesh(np.asarray(devices[:num]), ("batch",))
    return NamedSharding(mesh, PartitionSpec("batch"))


def replicated() -> NamedSharding:
    """Every device holds the whole array (training states, on every process)."""
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("batch",)), PartitionSpec())


# Several hosts: one process per host, all running the same command.
HOST_ENV = ("LPD_COORDINATOR", "LPD_NUM_PROCESSES", "LPD_PROCESS_ID")


def start_hosts(
    coordinator: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    detect: bool = False,
) -> None:
    """Joins this process to a run over several hosts (``jax.distributed``).

    Give all three of ``coordinator`` (``host:port`` of process 0),
    ``num_processes`` and ``process_id``, from flags or from
    ``LPD_COORDINATOR``, ``LPD_NUM_PROCESSES`` and ``LPD_PROCESS_ID``; or
    ``detect`` to let jax read them from the cluster (TPU pods, SLURM, Open
    MPI). Nothing happens when none is given. Must run before jax's backends
    start.
    """
    given = dict(zip(HOST_ENV, (coordinator, num_processes, process_id), strict=True))
    for name, value in given.items():
        if value is None and os.environ.get(name, "").strip():
            given[name] = os.environ[name].strip()
    values = [v for v in given.values() if v is not None]
    if not values and not detect:
        return
    if values and len(values) != len(given):
        missing = [n for n, v in given.items() if v is None]
        raise LpdError(
            "several hosts need --coordinator, --num-processes and --process-id "
            f"together (or {', '.join(HOST_ENV)}); missing: {', '.join(missing)}"
        )
    kwargs = {}
    if values:
        try:
            count, index = int(given[HOST_ENV[1]]), int(given[HOST_ENV[2]])
        except ValueError:
            raise LpdError(
                "--num-processes and --process-id must be whole numbers, got "
                f"{given[HOST_ENV[1]]!r} and {given[HOST_ENV[2]]!r}"
            ) from None
        if count < 1 or not 0 <= index < count:
            raise LpdError(
                f"--process-id must lie in [0, {count - 1}] and --num-processes be "
                f"at least 1, got {index} and {count}"
            )
        address = str(given[HOST_ENV[0]])
        if ":" not in address:
            raise LpdError(f"--coordinator must be host:port, got {address!r}")
        kwargs = dict(
            coordinator_address=address, num_processes=count, process_id=index
        )
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # jax raises RuntimeError/ValueError, with long text.
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LpdError(
            f"could not join the run over several hosts: {textwrap.shorten(line, 200)}"
        ) from None


def is_main() -> bool:
    """True in the process that writes files, logs and progress bars (the
    only one, unless the run spans several hosts)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches this point (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """``jax.device_get`` that also works on arrays spread over several
    processes: those are gathered (every process gets the whole array)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


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
    hosts = jax.process_count()
    hosts = f", {hosts} processes" if hosts > 1 else ""
    return (
        f"platform: {jax.default_backend()}, {len(devices)} device"
        f"{'s' if len(devices) != 1 else ''}{hosts} ({names}{more})"
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
