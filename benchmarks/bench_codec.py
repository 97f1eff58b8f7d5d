"""Codec throughput: encode and decode (policies/s), training steps/s.

    python benchmarks/bench_codec.py [--config FILE[:ARG]] [--config.x.y=v ...]

Uses the policy layout of the config's archive settings and random weights
(speed does not depend on the values), so no archive is needed. Writes
benchmarks/results/codec.json.
"""

# isort: off
import common  # First: gives XLA one host device per core before jax starts.

# isort: on

import jax
import jax.numpy as jnp

from lpd import archive, codec_stage, codec_train, training
from lpd import codec as codec_lib


def bench_codec(config, num_policies=1024):
    c, a = config.codec, config.archive
    meta = archive.describe_config(a)
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
    encode_s = common.best_time(lambda: encode(inputs), 5)
    decode_s = common.best_time(lambda: decode(latents), 5)

    stats = codec_lib.fit_standardiser(inputs)
    _, policy = archive.make_task(meta)
    obs = jnp.zeros((num_policies, c.obs_per_policy, meta["policy"]["obs_size"]))
    acts = jnp.zeros((num_policies, c.obs_per_policy, meta["policy"]["action_size"]))
    data = codec_train.CodecData(inputs, obs, acts)
    optimizer = training.make_optimizer(1e-3, 10, 1000, 0.0, 1.0)
    results = {}
    for functional in (0.0, 1.0):
        weights = codec_train.LossWeights(1e-6, 0.01, 0.01, functional)
        chunk = codec_train.make_train_chunk(
            model, policy, optimizer, weights, c.log_period, c.batch_size
        )
        fresh = model.init(key, jax.tree.map(lambda x: x[0], inputs))  # donated
        state = [codec_train.TrainState(fresh, optimizer.init(fresh))]

        def run(chunk=chunk, state=state):
            state[0], metrics = chunk(state[0], (data, stats), jnp.int32(0), key)
            return metrics

        steps = c.log_period / common.best_time(run, 2)
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


if __name__ == "__main__":
    common.main("codec", bench_codec, __doc__)
