"""The archive artifact: the ``Archive`` struct, its files, and the npz exchange format.

``<workdir>/archive/`` holds, once the stage is complete:

- ``repertoire/``: orbax checkpoint of an :class:`Archive`;
- ``meta.json``: env, backend, episode length, descriptor names and bounds,
  fitness offset, policy layout, package versions, config (written last: its
  presence marks the stage complete);
- ``heatmap.png``, ``metrics.jsonl``, ``tensorboard/``, ``config.json``.

The npz exchange format (``lpd export-archive`` / ``lpd import-archive``) is
described in the README; it is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import flax.struct
import jax
import numpy as np

from lpd import checkpoints
from lpd import policy as policy_lib
from lpd.errors import LpdError
from lpd.logs import write_json_atomic

FORMAT = "lpd-archive/1"
PACKAGES = ("lpd", "jax", "jaxlib", "flax", "optax", "brax", "qdax", "orbax-checkpoint")


@flax.struct.dataclass
class Archive:
    """A grid of cells, each empty or holding one elite policy.

    Attributes:
        params: policy parameters, a variables dict with leaves ``[C, ...]``
            (zeros in empty cells).
        fitnesses: ``[C]`` episode return of each elite, ``-inf`` where empty.
        descriptors: ``[C, D]`` achieved descriptor of each elite.
        centroids: ``[C, D]`` cell centres.
    """

    params: Any
    fitnesses: jax.Array
    descriptors: jax.Array
    centroids: jax.Array

    @property
    def filled(self) -> jax.Array:
        """``[C]`` True where a cell holds an elite."""
        return self.fitnesses > -np.inf


def elites(archive: Archive) -> tuple[np.ndarray, dict]:
    """Indices ``[N]`` of the filled cells and their params ``{path: [N, ...]}``."""
    idx = np.flatnonzero(np.asarray(archive.filled))
    flat = policy_lib.flatten_params(archive.params)
    return idx, {p: np.asarray(x)[idx] for p, x in flat.items()}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that produced an artifact."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def archive_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / "archive"


def _template(meta: dict) -> Archive:
    """Shapes and dtypes of the archive described by ``meta``."""
    cells, dims = meta["num_cells"], len(meta["descriptor_names"])
    f32 = np.float32
    flat = {
        path: jax.ShapeDtypeStruct((cells, *shape), f32)
        for path, shape in meta["layout"].items()
    }
    return Archive(
        params=policy_lib.unflatten_params(flat),
        fitnesses=jax.ShapeDtypeStruct((cells,), f32),
        descriptors=jax.ShapeDtypeStruct((cells, dims), f32),
        centroids=jax.ShapeDtypeStruct((cells, dims), f32),
    )


def save_archive(workdir, archive: Archive, meta: dict, plot_fn=None) -> None:
    """Writes the archive, optionally its plot, and ``meta.json`` last."""
    directory = archive_dir(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints.save_tree(directory / "repertoire", archive)
    if plot_fn is not None:
        plot_fn(archive, meta, directory / "heatmap.png")
    write_json_atomic(directory / "meta.json", meta)


def load_meta(workdir) -> dict:
    path = archive_dir(workdir) / "meta.json"
    if not path.exists():
        raise LpdError(
            f"no complete archive in {archive_dir(workdir)}: run `lpd archive` "
            "(or `lpd import-archive`) with this --workdir first"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LpdError(f"{path} is corrupt ({e}); delete the archive dir") from e


def load_archive(workdir) -> tuple[Archive, dict]:
    """The archive of ``workdir`` and its metadata."""
    meta = load_meta(workdir)
    path = archive_dir(workdir) / "repertoire"
    return checkpoints.load_tree(path, _template(meta), "the archive"), meta


def export_npz(workdir, out: str | os.PathLike) -> Path:
    """Writes the archive of ``workdir`` as an npz (see the README's schema)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise LpdError(f"--out must end in .npz, got {out}")
    if out.exists():
        raise LpdError(f"{out} already exists; choose another --out or delete it")
    archive, meta = load_archive(workdir)
    arrays = {
        path: np.asarray(leaf)
        for path, leaf in policy_lib.flatten_params(archive.params).items()
    }
    arrays.update(
        fitnesses=np.asarray(archive.fitnesses),
        descriptors=np.asarray(archive.descriptors),
        centroids=np.asarray(archive.centroids),
        metadata=np.asarray(json.dumps(meta)),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, out)
    return out


REQUIRED_METADATA = ("env", "backend", "episode_length", "policy")


def read_npz(path: str | os.PathLike, describe_env) -> tuple[Archive, dict]:
    """Reads and validates an archive npz.

    Args:
        path: the npz file.
        describe_env: ``describe_env(meta) -> meta`` fills in what the env
            determines (sizes, descriptor names and bounds, layout, offset),
            raising ``LpdError`` for an unknown env.
    """
    path = Path(path)
    if not path.is_file():
        raise LpdError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise LpdError(f"{path} is not a readable npz ({e})") from e
    missing = {"fitnesses", "descriptors", "centroids", "metadata"} - set(arrays)
    if missing:
        raise LpdError(f"{path} lacks keys {sorted(missing)}; see the README schema")
    try:
        given = json.loads(str(arrays.pop("metadata")))
    except json.JSONDecodeError as e:
        raise LpdError(f"{path}: 'metadata' is not JSON ({e})") from e
    absent = [k for k in REQUIRED_METADATA if k not in given]
    if absent:
        raise LpdError(f"{path}: metadata lacks {absent}; see the README schema")
    meta = describe_env(given)
    archive = _archive_from_arrays(arrays, meta, path)
    meta.update(
        num_cells=int(archive.fitnesses.shape[0]),
        num_elites=int(np.sum(archive.filled)),
        source=f"imported from {path.name}",
        grid_shape=given.get("grid_shape"),
        iterations=given.get("iterations"),
        config=given.get("config"),
        versions=package_versions(),
        format=FORMAT,
    )
    return archive, meta


def _archive_from_arrays(arrays: dict, meta: dict, path: Path) -> Archive:
    """Checks every key and shape against ``meta`` and builds the archive."""
    fitnesses = arrays.pop("fitnesses").astype(np.float32)
    descriptors = arrays.pop("descriptors").astype(np.float32)
    centroids = arrays.pop("centroids").astype(np.float32)
    cells, dims = fitnesses.shape[0], len(meta["descriptor_names"])
    expected = {
        "fitnesses": ((cells,), fitnesses.shape),
        "descriptors": ((cells, dims), descriptors.shape),
        "centroids": ((cells, dims), centroids.shape),
    }
    layout = meta["layout"]
    if set(arrays) != set(layout):
        raise LpdError(
            f"{path}: policy keys {sorted(arrays)} do not match the layout of "
            f"{meta['env']} with policy {meta['policy']}: {sorted(layout)}"
        )
    for name, shape in layout.items():
        expected[name] = ((cells, *shape), arrays[name].shape)
    for name, (want, got) in expected.items():
        if tuple(want) != tuple(got):
            raise LpdError(f"{path}: {name!r} has shape {got}, expected {want}")
    if np.isnan(fitnesses).any():
        raise LpdError(f"{path}: 'fitnesses' holds NaN; mark empty cells with -inf")
    params = {k: v.astype(np.float32) for k, v in arrays.items()}
    return Archive(
        params=policy_lib.unflatten_params(params),
        fitnesses=fitnesses,
        descriptors=descriptors,
        centroids=centroids,
    )
