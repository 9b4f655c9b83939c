"""Device meshes: a 'seed' axis (SAE seeds, or any independent replicas) and a 'data' axis."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def make_mesh(n_seed: int | None = None, n_data: int = 1, devices=None) -> Mesh:
    """Mesh(('seed', 'data')) over n_seed * n_data devices (n_seed=None: all devices / n_data)."""
    devices = list(jax.devices() if devices is None else devices)
    if n_seed is None:
        n_seed = len(devices) // n_data
    if n_seed < 1 or n_data < 1 or n_seed * n_data > len(devices):
        raise ValueError(f"mesh seed={n_seed} x data={n_data} needs {n_seed * n_data} devices; "
                         f"{len(devices)} available")
    return Mesh(np.array(devices[:n_seed * n_data]).reshape(n_seed, n_data), ("seed", "data"))
