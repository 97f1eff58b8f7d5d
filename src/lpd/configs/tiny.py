"""Tiny config for tests and smoke runs: compiles fast, runs in seconds."""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config(env: str = "walker2d_uni") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.archive = default.get_archive_config()
    config.archive.update(
        env=env,
        episode_length=50,
        policy_hidden_sizes=(8,),
        batch_size=16,
        iso_sigma=0.02,
        line_sigma=0.1,
        num_iterations=4,
        log_period=2,
        grid_shape=(5,) * {"hopper_uni": 1, "ant_uni": 4}.get(env, 2),
        num_cvt_cells=16,
    )
    config.codec = default.get_codec_config()
    config.codec.update(
        latent_dim=8,
        encoder_features=8,
        encoder_hidden=32,
        decoder_hidden=32,
        row_features=16,
        basis_dim=4,
        functional_weight=1.0,
        visit_period=20,  # One visit of the decoded policies' states, mid-run.
        num_steps=40,
        log_period=20,
        batch_size=8,
        warmup_steps=5,
        eval_episodes=2,
        eval_batch_size=16,
        obs_per_policy=8,
    )
    config.diffusion = default.get_diffusion_config()
    config.diffusion.update(
        num_timesteps=50,
        num_tokens=2,
        width=16,
        depth=1,
        num_heads=2,
        num_steps=40,
        log_period=20,
        batch_size=16,
        warmup_steps=5,
        sample_steps=10,
        sweep_guidance=(0.0, 2.0),
        sweep_conditions=8,
        sweep_episodes=2,
        sweep_batch_size=8,
        ema_decay=0.5,
    )
    config.text = default.get_text_config()
    config.text.update(
        label_episodes=2, label_batch_size=16, num_steps=40, log_period=20
    )
    config.evaluate = default.get_evaluate_config()
    config.evaluate.update(episodes=2, uniform_conditions=8, text_samples=4)
    return config
