"""Spreading a batch over the local devices (CPU host devices, GPUs, TPUs)."""

from __future__ import annotations

import math

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
