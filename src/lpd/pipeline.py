"""The pipeline's stages in order; the one module that imports every stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_collections

from lpd import (
    archive,
    codec_stage,
    diffusion_stage,
    diffusion_train,
    evaluate_stage,
    text,
    text_stage,
)
from lpd.errors import LpdError
from lpd.workdir import archive_dir, is_complete

STAGES = {  # Each: (config, workdir) -> the stage's directory.
    "archive": archive.run_archive_stage,
    "train-codec": codec_stage.run_codec_stage,
    "train-diffusion": diffusion_stage.run_diffusion_stage,
    "train-text": text_stage.run_text_stage,
    "evaluate": evaluate_stage.run_evaluate_stage,
}


def validate(config: ml_collections.ConfigDict, names) -> None:
    """Checks, before any stage starts, what the stages ``names`` will need
    of the config (and the text encoder's weights); one-line errors."""
    latent_dim = config.codec.latent_dim
    checks = {
        "archive": lambda: archive.validate(config),
        "train-codec": lambda: codec_stage.validate(config),
        "train-diffusion": lambda: diffusion_stage.validate(config, latent_dim),
        "train-text": lambda: (
            text_stage.validate(config),
            diffusion_train.validate(config.diffusion, latent_dim),
            text.model_dir(),
        ),
        "evaluate": lambda: (evaluate_stage.validate(config), text.model_dir()),
    }
    for name in names:
        checks[name]()


def check_disk(config: ml_collections.ConfigDict, workdir, names) -> None:
    """Refuses in one line a run whose archive would not fit on the workdir's
    disk (checked before the first stage, unless the archive is there)."""
    if "archive" not in names or is_complete(archive_dir(workdir)):
        return
    need = archive.disk_bytes(config)
    path = Path(workdir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise LpdError(
            f"the archive needs about {need / 2**30:.1f} GiB of disk and {existing} "
            f"has {free / 2**30:.1f} GiB free: free some, or use another --workdir"
        )
