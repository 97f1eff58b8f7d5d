"""Evaluation throughput next to raw Brax stepping, and the cost of sampling.

    python benchmarks/bench_evaluate.py [--config FILE[:ARG]] [--config.x.y=v ...]

Writes benchmarks/results/evaluate.json, all measured in one run:

- env steps per second of the evaluation's scoring function (QDax's, each
  policy on ``evaluate.episodes`` random-reset episodes, the batch sharded
  over the local devices), and of a jitted ``lax.scan`` over a vmapped
  ``env.step`` with random actions for the same number of environments and
  the same sharding; their ratio (goal >= 0.9);
- the time to sample (DDIM, ``diffusion.sample_steps``, guidance on) and
  decode one policy per condition, as a fraction of the time to evaluate
  them (goal <= 0.05).

The models are freshly initialised (speed does not depend on the weights);
the batch is what ``lpd evaluate`` picks for ``--num`` policies. The same
figures under ``paper_protocol``: 50 episodes of 1000 steps, 64 policies.
"""

import argparse

# isort: off
import common  # First: gives XLA one host device per core before jax starts.

# isort: on

import jax
import jax.numpy as jnp

from lpd import (
    archive,
    codec_stage,
    diffusion,
    diffusion_train,
    evaluate_stage,
    generator,
    rollouts,
)
from lpd import codec as codec_lib
from lpd import policy as policy_lib
from lpd.config import load_config
from lpd.devices import batch_sharding


def make_generator(config, meta):
    """A Generator with freshly initialised codec and denoiser."""
    key_codec, key_denoiser, key_policies = jax.random.split(jax.random.key(0), 3)
    env, policy = archive.make_task(meta)
    flat = policy_lib.flatten_params(
        policy_lib.init_policies(policy, env.observation_size, 64, key_policies)
    )
    codec = codec_stage.make_model(config.codec, meta["layout"])
    codec_params = codec.init(key_codec, {p: x[0] for p, x in flat.items()})
    denoiser = diffusion_train.make_denoiser(config.diffusion, config.codec.latent_dim)
    denoiser_params = denoiser.init(
        key_denoiser,
        jnp.zeros(config.codec.latent_dim),
        0,
        jnp.zeros(len(meta["descriptor_names"])),
        False,
    )
    return generator.Generator(
        config=config,
        archive_meta=meta,
        returns=False,
        denoiser=denoiser,
        denoiser_params=denoiser_params,
        schedule=diffusion.cosine_schedule(config.diffusion.num_timesteps),
        codec=codec,
        codec_params=codec_params,
        stats=codec_lib.fit_standardiser(flat),
        latent_scale=1.0,
    )


def bench_evaluate(config, num, repeats=2):
    c, a = config.evaluate, config.archive
    meta = archive.describe_config(a)
    env, policy = archive.make_task(meta)
    gen = make_generator(config, meta)
    key = jax.random.key(0)
    params = policy_lib.init_policies(policy, env.observation_size, 1, key)
    bytes_per_policy = rollouts.rollout_bytes_per_policy(
        env, policy, params, a.episode_length, c.episodes
    )
    batch = evaluate_stage.choose_batch_size(
        c.batch_size,
        num,
        evaluate_stage.ROLLOUT_MEMORY_FACTOR * bytes_per_policy,
        evaluate_stage.memory_budget(c.memory_fraction),
    )
    params = policy_lib.init_policies(policy, env.observation_size, batch, key)
    eval_fn = jax.jit(
        rollouts.make_episodes_eval_fn(env, policy, a.episode_length, c.episodes, batch)
    )
    eval_s = common.best_time(lambda: eval_fn(params, key), repeats)
    num_envs = batch * c.episodes
    steps = num_envs * a.episode_length
    sharding = batch_sharding(num_envs)

    @jax.jit
    def raw_rollout(key):
        keys = jax.random.split(key, num_envs)
        states = jax.vmap(env.reset)(jax.lax.with_sharding_constraint(keys, sharding))

        def step(states, key):
            actions = jax.random.uniform(key, (num_envs, env.action_size), minval=-1.0)
            actions = jax.lax.with_sharding_constraint(actions, sharding)
            return jax.vmap(env.step)(states, actions), None

        states, _ = jax.lax.scan(step, states, jax.random.split(key, a.episode_length))
        return states.reward

    raw_s = common.best_time(lambda: raw_rollout(key), repeats)
    sample_fn = generator.make_sample_fn(gen)
    cond = jax.random.uniform(key, (batch, len(meta["descriptor_names"])))
    sample_s = common.best_time(lambda: sample_fn(cond, key, jnp.float32(1.0)), repeats)
    return {
        "env": a.env,
        "backend": a.backend,
        "episode_length": a.episode_length,
        "episodes_per_policy": c.episodes,
        "policies": num,
        "batch_size": batch,
        "environments_per_call": num_envs,
        "rollout_bytes_per_policy": int(bytes_per_policy),
        "evaluate_env_steps_per_s": round(steps / eval_s),
        "raw_env_step_steps_per_s": round(steps / raw_s),
        "ratio_evaluate_to_raw": round(raw_s / eval_s, 3),
        "sample_steps": config.diffusion.sample_steps,
        "sample_and_decode_s": round(sample_s, 3),
        "evaluate_s": round(eval_s, 3),
        "sample_fraction_of_evaluate": round(sample_s / eval_s, 4),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=common.DEFAULT_CONFIG)
    parser.add_argument(
        "--num", type=int, default=685, help="policies to evaluate (default run: 685)"
    )
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    result = bench_evaluate(config, args.num)
    # The paper's protocol (50 episodes of 1000 steps) on fewer policies:
    # sampling costs the same per policy, the rollouts 25x more.
    paper = load_config(
        args.config,
        [
            *overrides,
            "--config.evaluate.episodes=50",
            "--config.archive.episode_length=1000",
        ],
    )
    result["paper_protocol"] = bench_evaluate(paper, 64, repeats=1)
    common.write_result(result, "evaluate", args.config, overrides)


if __name__ == "__main__":
    main()
