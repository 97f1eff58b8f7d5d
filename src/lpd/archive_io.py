"""The archive artifact: the ``Archive`` struct, its files, and the npz exchange format.

``<workdir>/archive/`` holds, once the stage is complete:

- ``repertoire/``: orbax checkpoint of an :class:`Archive`;
- ``actor/``: for a DCRL-ME search, its descriptor-conditioned actor
  (orbax; ``meta.json`` ``actor`` gives its layout);
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
from lpd import workdir as workdir_lib
from lpd.errors import LpdError
from lpd.workdir import archive_dir, atomic_path, write_json

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


def _template(meta: dict) -> Archive:
    """Shapes and dtypes of the archive described by ``meta``."""
    cells, dims = meta["num_cells"], len(meta["descriptor_names"])
    f32 = np.float32
    flat = policy_lib.layout_template(meta["layout"], (cells,))
    return Archive(
        params=policy_lib.unflatten_params(flat),
        fitnesses=jax.ShapeDtypeStruct((cells,), f32),
        descriptors=jax.ShapeDtypeStruct((cells, dims), f32),
        centroids=jax.ShapeDtypeStruct((cells, dims), f32),
    )


ACTOR_PREFIX = "actor/"  # npz keys of the DCRL actor: "actor/params/Dense_0/kernel"


def actor_meta(actor) -> dict:
    """``meta.json``'s ``actor``: the DCRL actor's layout and size."""
    flat = policy_lib.flatten_params(actor)
    return {
        "kind": "dcrl_me",
        "layout": {path: list(flat[path].shape) for path in sorted(flat)},
        "params": policy_lib.count_params(actor),
    }


def save_archive(
    directory, archive: Archive, meta: dict, plot_fn=None, actor=None
) -> None:
    """Writes the archive (and a DCRL ``actor``, whose layout ``meta``
    names) into ``directory``, optionally its plot, and ``meta.json`` last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints.save_tree(directory / "repertoire", archive)
    if actor is not None:
        checkpoints.save_tree(directory / "actor", actor)
    if plot_fn is not None:
        plot_fn(archive, meta, directory / "heatmap.png")
    write_json(directory / "meta.json", meta)


def load_meta(workdir) -> dict:
    path = archive_dir(workdir) / "meta.json"
    if not path.exists():
        raise LpdError(
            f"no complete archive in {archive_dir(workdir)}: run `lpd archive` "
            "(or `lpd import-archive`) with this --workdir first"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LpdError(f"{path} is corrupt ({e}); delete the archive dir") from e
    if "params/obs_std" in meta.get("layout", {}):
        raise LpdError(
            f"{archive_dir(workdir)} was written by an older lpd (normaliser as "
            "obs_std); export it with that version and import it into a new --workdir"
        )
    return meta


def load_archive(workdir) -> tuple[Archive, dict]:
    """The archive of ``workdir`` and its metadata."""
    meta = load_meta(workdir)
    path = archive_dir(workdir) / "repertoire"
    return checkpoints.load_tree(path, _template(meta), "the archive"), meta


def load_actor(workdir) -> dict | None:
    """The DCRL actor saved with the archive of ``workdir``, or None."""
    meta = load_meta(workdir)
    if "actor" not in meta:
        return None
    template = policy_lib.unflatten_params(
        policy_lib.layout_template(meta["actor"]["layout"])
    )
    path = archive_dir(workdir) / "actor"
    return checkpoints.load_tree(path, template, "the DCRL actor")


def export_npz(workdir, out: str | os.PathLike) -> Path:
    """Writes the archive of ``workdir`` as an npz (see the README's schema)."""
    out = workdir_lib.check_out(out, ".npz")
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
    actor = load_actor(workdir)
    if actor is not None:
        for path, leaf in policy_lib.flatten_params(actor).items():
            arrays[ACTOR_PREFIX + path] = np.asarray(leaf)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)
    return out


REQUIRED_METADATA = ("env", "backend", "episode_length", "policy")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # An npz is a zip archive.


def _load_arrays(path: Path) -> dict:
    if not path.is_file():
        raise LpdError(f"npz file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) not in ZIP_MAGIC:
            raise LpdError(f"{path} is not an npz file (numpy.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:  # A damaged zip fails in many ways.
        raise LpdError(f"{path} is not a readable npz ({e})") from e


def _check_metadata(given, path: Path) -> None:
    """One-line errors for metadata that cannot describe an archive."""
    if not isinstance(given, dict):
        raise LpdError(f"{path}: 'metadata' must be a JSON object")
    absent = [k for k in REQUIRED_METADATA if k not in given]
    if absent:
        raise LpdError(f"{path}: metadata lacks {absent}; see the README schema")
    length = given["episode_length"]
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise LpdError(f"{path}: metadata episode_length must be > 0, got {length!r}")
    policy = given["policy"]
    hidden = policy.get("hidden_sizes") if isinstance(policy, dict) else None
    if (
        not isinstance(hidden, list)
        or not hidden
        or not all(isinstance(h, int) and h > 0 for h in hidden)
        or not isinstance(policy.get("normalise_obs", False), bool)
    ):
        raise LpdError(
            f"{path}: metadata policy must be {{'hidden_sizes': [positive ints], "
            f"'normalise_obs': bool}}, got {policy!r}"
        )


def read_npz(path: str | os.PathLike, describe_env) -> tuple[Archive, dict, Any]:
    """Reads and validates an archive npz (keys, shapes, dtypes, values);
    returns the archive, its metadata and its DCRL actor (or None).

    Args:
        path: the npz file.
        describe_env: ``describe_env(meta) -> meta`` fills in what the env
            determines (sizes, descriptor names and bounds, layout, offset),
            raising ``LpdError`` for an unknown env or backend.
    """
    path = Path(path)
    arrays = _load_arrays(path)
    missing = {"fitnesses", "descriptors", "centroids", "metadata"} - set(arrays)
    if missing:
        raise LpdError(f"{path} lacks keys {sorted(missing)}; see the README schema")
    try:
        given = json.loads(str(arrays.pop("metadata")))
    except json.JSONDecodeError as e:
        raise LpdError(f"{path}: 'metadata' is not JSON ({e})") from e
    _check_metadata(given, path)
    meta = describe_env(given)
    actor = _actor_from_arrays(arrays, meta, path)
    if actor is not None:
        meta["actor"] = actor_meta(actor)
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
    return archive, meta, actor


def _actor_from_arrays(arrays: dict, meta: dict, path: Path):
    """Pops the ``actor/...`` keys: a DCRL actor is the policy's layout with
    one first-layer kernel row per descriptor dimension added; None when
    there are none."""
    names = [k for k in arrays if k.startswith(ACTOR_PREFIX)]
    if not names:
        return None
    flat = {k.removeprefix(ACTOR_PREFIX): arrays.pop(k) for k in names}
    expected = {k: list(v) for k, v in meta["layout"].items()}
    first = "params/Dense_0/kernel"
    if first in expected:
        expected[first][0] += len(meta["descriptor_names"])
    for name, x in flat.items():
        if x.dtype.kind != "f" or not np.isfinite(x).all():
            raise LpdError(f"{path}: {ACTOR_PREFIX + name!r} must hold finite floats")
    got = {k: list(v.shape) for k, v in flat.items()}
    if got != expected:
        raise LpdError(
            f"{path}: the actor's keys and shapes {got} do not match a DCRL actor "
            f"of this policy: {expected}"
        )
    return policy_lib.unflatten_params(
        {k: v.astype(np.float32) for k, v in flat.items()}
    )


def _legacy_normaliser(arrays: dict) -> dict:
    """``params/obs_std`` (the format before the log-scale normaliser) as
    ``params/obs_log_std``."""
    if "params/obs_std" not in arrays or "params/obs_log_std" in arrays:
        return arrays
    arrays = dict(arrays)
    std = np.asarray(arrays.pop("params/obs_std"), np.float64)
    arrays["params/obs_log_std"] = np.log(np.maximum(std, policy_lib.MIN_OBS_STD))
    return arrays


def _check_values(fitnesses, descriptors, centroids, params, path) -> None:
    """Refuses values no archive holds: NaN or +inf returns, no elite,
    non-finite or out-of-range descriptors, non-finite weights or centroids."""
    if np.isnan(fitnesses).any() or np.isposinf(fitnesses).any():
        raise LpdError(
            f"{path}: 'fitnesses' holds NaN or +inf; give finite returns and "
            "mark empty cells with -inf"
        )
    filled = np.isfinite(fitnesses)
    if not filled.any():
        raise LpdError(f"{path}: every cell is empty (all fitnesses -inf)")
    d = descriptors[filled]
    if not np.isfinite(d).all() or d.min() < 0.0 or d.max() > 1.0:
        raise LpdError(
            f"{path}: the elites' 'descriptors' must be finite and lie in [0, 1] "
            "(feet-contact fractions)"
        )
    if not np.isfinite(centroids).all():
        raise LpdError(f"{path}: 'centroids' must be finite")
    for name, x in params.items():
        if not np.isfinite(x[filled]).all():
            raise LpdError(f"{path}: {name!r} holds NaN or inf in a filled cell")


def _archive_from_arrays(arrays: dict, meta: dict, path: Path) -> Archive:
    """Checks every key, shape, dtype and value against ``meta``; builds the
    archive (empty cells' weights zeroed)."""
    arrays = _legacy_normaliser(arrays)
    for name, x in arrays.items():
        if x.dtype.kind not in "iuf":
            raise LpdError(f"{path}: {name!r} must hold numbers, not {x.dtype}")
    fitnesses = arrays.pop("fitnesses").astype(np.float32)
    descriptors = arrays.pop("descriptors").astype(np.float32)
    centroids = arrays.pop("centroids").astype(np.float32)
    if fitnesses.ndim != 1:
        raise LpdError(f"{path}: 'fitnesses' has shape {fitnesses.shape}, expected [C]")
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
    _check_values(fitnesses, descriptors, centroids, arrays, path)
    filled = np.isfinite(fitnesses)
    params = {
        k: np.where(filled.reshape(-1, *[1] * (v.ndim - 1)), v, 0).astype(np.float32)
        for k, v in arrays.items()
    }
    return Archive(
        params=policy_lib.unflatten_params(params),
        fitnesses=fitnesses,
        descriptors=np.where(filled[:, None], descriptors, 0).astype(np.float32),
        centroids=centroids,
    )
