"""Archive-stage throughput next to raw Brax stepping, measured in one run.

    python benchmarks/bench_archive.py [--config FILE[:ARG]] [--config.x.y=v ...]

Writes benchmarks/results/archive.json: environment steps per second of the
archive stage (QD iterations: emit, roll out, insert) and of a jitted
``lax.scan`` over a vmapped ``env.step`` with random actions in [-1, 1], at
the same batch size and sharding, and their ratio.
"""

# isort: off
import common  # First: gives XLA one host device per core before jax starts.

# isort: on

import jax
import jax.numpy as jnp

from lpd import archive, qd
from lpd import policy as policy_lib
from lpd.devices import batch_sharding


def bench_archive(config, repeats=3):
    c = config.archive
    spec = archive.spec_from_config(config)
    fns = archive.make_search_fns(spec)
    env = fns.env
    key = jax.random.key(0)
    genotypes = policy_lib.init_policies(
        fns.policy, env.observation_size, c.batch_size, key
    )
    centroids = qd.make_centroids(
        "grid", tuple(c.grid_shape), 0, len(c.grid_shape), key
    )
    state = list(fns.init_fn(genotypes, centroids, key)[:2])

    def run_chunk():
        state[0], state[1], metrics = fns.chunk_fn(
            state[0], state[1], jnp.int32(0), key
        )
        return metrics

    chunk_s = common.best_time(run_chunk, repeats)
    qd_steps = c.log_period * c.batch_size * c.episode_length / chunk_s

    sharding = batch_sharding(c.batch_size)

    @jax.jit
    def raw_rollout(key):
        keys = jax.random.split(key, c.batch_size)
        states = jax.vmap(env.reset)(jax.lax.with_sharding_constraint(keys, sharding))

        def step(states, key):
            actions = jax.random.uniform(
                key, (c.batch_size, env.action_size), minval=-1.0
            )
            actions = jax.lax.with_sharding_constraint(actions, sharding)
            return jax.vmap(env.step)(states, actions), None

        states, _ = jax.lax.scan(step, states, jax.random.split(key, c.episode_length))
        return states.reward

    raw_s = common.best_time(lambda: raw_rollout(key), repeats)
    raw_steps = c.batch_size * c.episode_length / raw_s
    return {
        "env": c.env,
        "backend": c.backend,
        "batch_size": c.batch_size,
        "episode_length": c.episode_length,
        "policy_hidden_sizes": list(c.policy_hidden_sizes),
        "emitter": c.emitter,
        "iterations_per_chunk": c.log_period,
        "archive_env_steps_per_s": round(qd_steps),
        "raw_env_step_steps_per_s": round(raw_steps),
        "ratio_archive_to_raw": round(qd_steps / raw_steps, 3),
        "seconds_per_iteration": round(chunk_s / c.log_period, 4),
    }


if __name__ == "__main__":
    common.main("archive", bench_archive, __doc__)
