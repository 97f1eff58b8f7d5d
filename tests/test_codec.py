"""The weight codec on synthetic policy pytrees (no Brax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpd import codec as codec_lib
from lpd import codec_train, training
from lpd import policy as policy_lib

LAYOUTS = [
    ((4,), False, 3, 2),
    ((5, 6), True, 3, 2),
    ((8, 8, 4), False, 7, 1),
]


def _archive(hidden, normalise, obs, act, num, seed=0):
    """``num`` policies whose every leaf (biases too) is random."""
    policy = policy_lib.Policy(hidden, act, normalise)
    params = policy_lib.init_policies(policy, obs, num, jax.random.key(seed))
    flat = policy_lib.flatten_params(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    flat = {
        p: x + 0.3 * jax.random.normal(k, x.shape)
        for (p, x), k in zip(sorted(flat.items()), keys, strict=True)
    }
    return policy, flat


@pytest.mark.parametrize("hidden, normalise, obs, act", LAYOUTS)
def test_flat_round_trip_and_decoder_shapes(hidden, normalise, obs, act):
    policy, flat = _archive(hidden, normalise, obs, act, 3)
    nested = policy_lib.unflatten_params(flat)
    assert policy_lib.flatten_params(nested).keys() == flat.keys()
    layout = policy_lib.policy_layout(policy, obs)
    model = codec_lib.Codec(
        codec_lib.as_layout(layout),
        latent_dim=5,
        encoder_features=4,
        encoder_hidden=8,
        decoder_hidden=8,
        row_features=6,
    )
    one = jax.tree.map(lambda x: x[0], flat)
    params = model.init(jax.random.key(0), one)
    mean, logvar = model.apply(params, one, method="encode")
    assert mean.shape == logvar.shape == (5,)
    decoded = model.apply(params, mean, method="decode")
    assert {p: x.shape for p, x in decoded.items()} == layout
    # The decoded pytree is a policy that runs.
    actions = policy.apply(policy_lib.unflatten_params(decoded), jnp.ones(obs))
    assert actions.shape == (act,)


def test_decoder_size_grows_with_rows_plus_cols_not_their_product():
    def size(n):
        layout = codec_lib.as_layout({"k": (n, n)})
        model = codec_lib.Codec(layout, 4, 4, 4, decoder_hidden=4, row_features=4)
        params = model.init(jax.random.key(0), {"k": jnp.zeros((n, n))})
        return policy_lib.count_params(params["params"]["decoder"])

    # Rows (embeddings) and columns (output layer) each add 4 per unit.
    assert size(200) - size(100) == 100 * 4 + 100 * (4 + 1)


def test_standardiser_is_invertible_and_standardises():
    _, flat = _archive((5, 6), True, 3, 2, 50)
    flat = {p: x + 3.0 for p, x in flat.items()}  # Non-zero means.
    stats = codec_lib.fit_standardiser(flat)
    z = codec_lib.standardise(stats, flat)
    back = codec_lib.unstandardise(stats, z)
    for p in flat:
        np.testing.assert_allclose(back[p], flat[p], rtol=1e-6, atol=1e-6)
        varying = np.asarray(jnp.std(flat[p], axis=0)) > 1e-3
        np.testing.assert_allclose(np.asarray(jnp.mean(z[p], axis=0)), 0, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(jnp.std(z[p], axis=0))[varying], 1, rtol=1e-4
        )
    # Constant elements get the floor, not a zero division.
    constant = codec_lib.fit_standardiser({"c": jnp.ones((4, 3))})
    assert np.all(np.isfinite(codec_lib.standardise(constant, {"c": jnp.ones(3)})["c"]))


def test_reconstruction_error_counts_each_tensor_equally():
    inputs = {"big": jnp.zeros((3, 30, 30)), "small": jnp.zeros((3, 2))}
    decoded = {"big": jnp.ones((3, 30, 30)), "small": jnp.full((3, 2), 2.0)}
    total, per_tensor = codec_train.reconstruction_error(decoded, inputs)
    assert float(per_tensor["big"]) == 1.0 and float(per_tensor["small"]) == 4.0
    assert float(total) == 5.0


@pytest.mark.parametrize("functional", [0.0, 1.0])
def test_tiny_archive_is_overfit(functional):
    policy, flat = _archive((8,), False, 4, 2, 6)
    stats = codec_lib.fit_standardiser(flat)
    inputs = codec_lib.standardise(stats, flat)
    obs = jax.random.normal(jax.random.key(3), (6, 5, 4))
    actions = jax.vmap(policy.apply)(policy_lib.unflatten_params(flat), obs)
    data = codec_train.CodecData(inputs, obs, actions)
    layout = policy_lib.policy_layout(policy, 4)
    model = codec_lib.Codec(codec_lib.as_layout(layout), 8, 16, 64, 64, 32)
    optimizer = training.make_optimizer(3e-3, 20, 600, 0.0, 1.0)
    weights = codec_train.LossWeights(1e-6, 0.0, 0.0, functional)
    chunk = codec_train.make_train_chunk(model, policy, optimizer, weights, 300, 6)
    params = model.init(jax.random.key(0), jax.tree.map(lambda x: x[0], inputs))
    state = codec_train.TrainState(params, optimizer.init(params))
    state, first = chunk(state, (data, stats), jnp.int32(0), jax.random.key(1))
    state, last = chunk(state, (data, stats), jnp.int32(300), jax.random.key(1))
    assert last["reconstruction"] < 0.02 < first["reconstruction"]
    decoded = jax.vmap(lambda x: model.apply(state.params, x))(inputs)
    decoded = codec_lib.unstandardise(stats, decoded)
    for p in flat:
        err = np.linalg.norm(decoded[p] - flat[p]) / np.linalg.norm(flat[p])
        assert err < 0.1, (p, err)
    if functional:
        assert last["functional"] < first["functional"]
