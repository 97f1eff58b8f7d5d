"""Latent sampling (DDIM-50/100, batch 1k and 10k) and denoiser training speed.

    python benchmarks/bench_diffusion.py [--config FILE[:ARG]] [--config.x.y=v ...]

Uses the config's denoiser on random latents and descriptors (speed does not
depend on the values); writes benchmarks/results/diffusion.json.
"""

# isort: off
import common  # First: gives XLA one host device per core before jax starts.

# isort: on

import jax
import jax.numpy as jnp

from lpd import diffusion, diffusion_train, training


def bench_diffusion(config, latent_dim=None, num_descriptors=2):
    c = config.diffusion
    latent_dim = latent_dim or config.codec.latent_dim
    model = diffusion_train.make_denoiser(c, latent_dim)
    schedule = diffusion.cosine_schedule(c.num_timesteps)
    key = jax.random.key(0)
    params = model.init(
        key, jnp.zeros(latent_dim), 0, jnp.zeros(num_descriptors), False
    )
    result = {
        "latent_dim": latent_dim,
        "denoiser_params": int(sum(x.size for x in jax.tree.leaves(params))),
    }
    for batch in (1_000, 10_000):
        cond = jax.random.uniform(key, (batch, num_descriptors))
        x_T = jax.random.normal(key, (batch, latent_dim))
        for steps in (50, 100):
            eps_fn = diffusion.guided_eps_fn(
                params, model, schedule, cond, 1.0, c.prediction
            )
            sample = jax.jit(
                lambda x, k, eps_fn=eps_fn, steps=steps: diffusion.ddim_sample(
                    eps_fn, schedule, x, steps, 0.0, k
                )
            )
            seconds = common.best_time(
                lambda sample=sample, x_T=x_T: sample(x_T, key), 1
            )
            result[f"ddim{steps}_batch{batch}_latents_per_s"] = round(batch / seconds)

    latents = jax.random.normal(key, (4096, latent_dim))
    descriptors = jax.random.uniform(key, (4096, num_descriptors))
    optimizer = training.make_optimizer(1e-3, 10, 1000, 0.0, 1.0)
    chunk = diffusion_train.make_train_chunk(
        model, schedule, optimizer, c, c.log_period
    )
    state = [
        {
            "params": params,
            "ema": jax.tree.map(jnp.copy, params),
            "opt_state": optimizer.init(params),
        }
    ]

    def run():
        state[0], metrics = chunk(state[0], (latents, descriptors), jnp.int32(0), key)
        return metrics

    result["train_steps_per_s"] = round(c.log_period / common.best_time(run, 2), 1)
    result["train_batch_size"] = c.batch_size
    return result


if __name__ == "__main__":
    common.main("diffusion", bench_diffusion, __doc__)
