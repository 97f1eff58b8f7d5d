"""The pipeline's stages in order; the one module that imports every stage."""

from __future__ import annotations

from lpd import archive, codec_stage, diffusion_stage, evaluate_stage, text_stage

STAGES = {  # Each: (config, workdir) -> the stage's directory.
    "archive": archive.run_archive_stage,
    "train-codec": codec_stage.run_codec_stage,
    "train-diffusion": diffusion_stage.run_diffusion_stage,
    "train-text": text_stage.run_text_stage,
    "evaluate": evaluate_stage.run_evaluate_stage,
}
