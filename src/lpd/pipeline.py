"""The pipeline's stages in order; the one module that imports every stage."""

from __future__ import annotations

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
