"""Codec throughput: encode and decode (policies/s), training steps/s.

    python benchmarks/bench_codec.py [--config FILE[:ARG]] [--config.x.y=v ...]

Uses the policy layout of the config's archive settings and random weights
(speed does not depend on the values), so no archive is needed. Writes
benchmarks/results/codec.json.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={len(os.sched_getaffinity(0))}"
    )

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lpd import archive, archive_io, codec_stage, codec_train  # noqa: E402
from lpd import codec as codec_lib  # noqa: E402
from lpd.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _best_time(fn, repeats=5):
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def bench_codec(config, num_policies=1024):
    c, a = config.codec, config.archive
    meta = archive.describe_env(
        {
            "env": a.env,
            "backend": a.backend,
            "episode_length": a.episode_length,
            "policy": {
                "hidden_sizes": list(a.policy_hidden_sizes),
                "normalise_obs": a.normalise_obs,
            },
        }
    )
    layout = {p: tuple(s) for p, s in meta["layout"].items()}
    key = jax.random.key(0)
    inputs = {
        p: jax.random.normal(jax.random.fold_in(key, i), (num_policies, *s))
        for i, (p, s) in enumerate(sorted(layout.items()))
    }
    model = codec_stage.make_model(c, layout)
    params = model.init(key, jax.tree.map(lambda x: x[0], inputs))
    encode = jax.jit(jax.vmap(lambda x: model.apply(params, x, method="encode")[0]))
    decode = jax.jit(jax.vmap(lambda z: model.apply(params, z, method="decode")))
    latents = encode(inputs)
    encode_s = _best_time(lambda: encode(inputs))
    decode_s = _best_time(lambda: decode(latents))

    stats = codec_lib.fit_standardiser(inputs)
    _, policy = archive.make_task(meta)
    obs = jnp.zeros((num_policies, c.obs_per_policy, meta["policy"]["obs_size"]))
    acts = jnp.zeros((num_policies, c.obs_per_policy, meta["policy"]["action_size"]))
    data = codec_train.CodecData(inputs, obs, acts)
    optimizer = codec_train.make_optimizer(1e-3, 10, 1000, 0.0, 1.0)
    results = {}
    for functional in (0.0, 1.0):
        weights = codec_train.LossWeights(1e-6, 0.01, 0.01, functional)
        chunk = codec_train.make_train_chunk(
            model, policy, optimizer, weights, c.log_period, c.batch_size
        )
        fresh = model.init(key, jax.tree.map(lambda x: x[0], inputs))  # donated
        state = [codec_train.TrainState(fresh, optimizer.init(fresh))]

        def run(chunk=chunk, state=state):
            state[0], metrics = chunk(state[0], data, stats, jnp.int32(0), key)
            return metrics

        steps = c.log_period / _best_time(run, repeats=2)
        results[f"train_steps_per_s_functional_{functional:g}"] = round(steps, 1)
    return {
        "env": a.env,
        "layout": {p: list(s) for p, s in layout.items()},
        "num_policies": num_policies,
        "latent_dim": c.latent_dim,
        "decoder_params": codec_lib.count_decoder_params(params),
        "encode_policies_per_s": round(num_policies / encode_s),
        "decode_policies_per_s": round(num_policies / decode_s),
        "train_batch_size": c.batch_size,
        **results,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default=str(ROOT / "experiments/configs/default.py")
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/codec.json"))
    args, overrides = parser.parse_known_args()
    result = bench_codec(load_config(args.config, overrides))
    result.update(
        devices=[str(d) for d in jax.local_devices()],
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        versions=archive_io.package_versions(),
        config=args.config,
        overrides=overrides,
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
