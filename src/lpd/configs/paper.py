"""Paper-scale archives (Hegde et al. 2023): `paper.py:<env>`.

100x100 grids for 2-D descriptors (10^4 cells for the ant's 4-D one),
128-128 tanh MLP policies with an observation normaliser, 1000-step episodes.
Meant for accelerator hosts; envs: walker2d, halfcheetah, humanoid, ant.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402

GRIDS = {
    "walker2d": (100, 100),
    "halfcheetah": (100, 100),
    "humanoid": (100, 100),
    "ant": (10, 10, 10, 10),
}


def get_config(env: str = "walker2d") -> ml_collections.ConfigDict:
    if env not in GRIDS:
        raise ValueError(f"paper.py:<env> takes one of {sorted(GRIDS)}, got {env!r}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.archive = default.get_archive_config()
    config.archive.update(
        env=f"{env}_uni",
        episode_length=1000,
        policy_hidden_sizes=(128, 128),
        normalise_obs=True,
        batch_size=4096,
        num_iterations=2000,
        log_period=50,
        grid_shape=GRIDS[env],
        num_cvt_cells=10_000,
    )
    config.codec = default.get_codec_config()
    config.codec.update(num_steps=20_000, eval_episodes=50, eval_batch_size=1024)
    config.diffusion = default.get_diffusion_config()
    config.diffusion.update(num_steps=50_000, sweep_conditions=1024, sweep_episodes=10)
    config.text = default.get_text_config()
    config.text.update(num_steps=50_000, label_episodes=10)
    config.evaluate = default.get_evaluate_config()
    config.evaluate.update(episodes=50)
    return config
