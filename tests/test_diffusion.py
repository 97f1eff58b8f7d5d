"""Diffusion core on toy data (no Brax)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lpd import diffusion, diffusion_train


def test_cosine_schedule_matches_hand_computed_values():
    s = 0.008
    schedule = diffusion.cosine_schedule(4, s=s)

    def f(t):
        return math.cos((t / 4 + s) / (1 + s) * math.pi / 2) ** 2

    for t in range(3):  # The last step is clipped at 0.999.
        assert schedule.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-5)
        assert schedule.betas[t] == pytest.approx(1 - f(t + 1) / f(t), rel=1e-5)
    assert schedule.betas[3] == pytest.approx(0.999)
    assert np.all(np.diff(np.asarray(schedule.alphas_cumprod)) < 0)


def test_timestep_embedding_values():
    emb = diffusion.timestep_embedding(jnp.array([0, 3]), 4, max_period=100.0)
    # Frequencies 1 and 1/10: [cos(t), cos(t/10), sin(t), sin(t/10)].
    np.testing.assert_allclose(emb[0], [1, 1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(
        emb[1], [math.cos(3), math.cos(0.3), math.sin(3), math.sin(0.3)], rtol=1e-6
    )


def _gaussian_eps_fn(schedule, mean, std):
    """Exact noise prediction for data ~ N(mean, std^2), per dimension."""

    def eps_fn(x, t):
        abar = schedule.alphas_cumprod[t][:, None]
        eps = (
            jnp.sqrt(1 - abar)
            * (x - jnp.sqrt(abar) * mean)
            / (abar * std**2 + 1 - abar)
        )
        x0 = (x - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
        return eps, x0

    return eps_fn


def test_ddim_with_every_step_and_eta_one_matches_ddpm_statistics():
    schedule = diffusion.cosine_schedule(1000)
    mean, std = jnp.array([1.5, -2.0]), jnp.array([0.5, 0.2])
    eps_fn = _gaussian_eps_fn(schedule, mean, std)
    x_T = jax.random.normal(jax.random.key(0), (20_000, 2))
    ddpm = jax.jit(lambda x, k: diffusion.ddpm_sample(eps_fn, schedule, x, k))
    ddim = jax.jit(
        lambda x, k, eta: diffusion.ddim_sample(eps_fn, schedule, x, 1000, eta, k)
    )
    a = np.asarray(ddpm(x_T, jax.random.key(1)))
    b = np.asarray(ddim(x_T, jax.random.key(2), 1.0))
    c = np.asarray(ddim(x_T, jax.random.key(3), 0.0))
    for samples in (a, b, c):
        np.testing.assert_allclose(samples.mean(0), mean, atol=0.02)
        np.testing.assert_allclose(samples.std(0), std, rtol=0.05)
    np.testing.assert_allclose(a.mean(0), b.mean(0), atol=0.02)
    np.testing.assert_allclose(a.std(0), b.std(0), rtol=0.03)


def _conditional_mixture(key, num):
    """Condition 0 -> mode (-2, -2), condition 1 -> mode (2, 2); std 0.1."""
    key_c, key_x = jax.random.split(key)
    cond = jax.random.bernoulli(key_c, 0.5, (num, 1)).astype(jnp.float32)
    x0 = (4.0 * cond - 2.0) + 0.1 * jax.random.normal(key_x, (num, 2))
    return x0, cond


@pytest.fixture(scope="module")
def trained_toy():
    schedule = diffusion.cosine_schedule(100)
    model = diffusion.Denoiser(latent_dim=2, num_tokens=2, width=32, depth=2)
    params = model.init(
        jax.random.key(0), jnp.zeros(2), 0, jnp.zeros(1), jnp.array(False)
    )
    optimizer = optax.adam(2e-3)

    @jax.jit
    def train(params, opt_state, key):
        def step(carry, k):
            params, opt_state = carry
            key_data, key_loss = jax.random.split(k)
            x0, cond = _conditional_mixture(key_data, 256)
            loss, grads = jax.value_and_grad(diffusion.diffusion_loss)(
                params, model, schedule, x0, cond, key_loss, "v", 0.1
            )
            updates, opt_state = optimizer.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), jax.random.split(key, 1500)
        )
        return params, losses

    params, losses = train(params, optimizer.init(params), jax.random.key(1))
    return schedule, model, params, np.asarray(losses)


def test_loss_falls_and_conditional_samples_land_on_their_mode(trained_toy):
    schedule, model, params, losses = trained_toy
    assert losses[-100:].mean() < 0.5 * losses[:100].mean()
    cond = jnp.concatenate([jnp.zeros((200, 1)), jnp.ones((200, 1))])
    eps_fn = diffusion.guided_eps_fn(params, model, schedule, cond, 0.0, "v")
    x_T = jax.random.normal(jax.random.key(2), (400, 2))
    samples = np.asarray(
        diffusion.ddim_sample(eps_fn, schedule, x_T, 50, 0.0, jax.random.key(3))
    )
    near_asked = np.linalg.norm(samples - (4 * np.asarray(cond) - 2), axis=1) < 0.5
    assert near_asked.mean() > 0.9


def test_guidance_zero_is_plain_conditional_sampling(trained_toy):
    schedule, model, params, _ = trained_toy
    cond = jnp.ones((8, 1))
    x_T = jax.random.normal(jax.random.key(4), (8, 2))
    guided = diffusion.guided_eps_fn(params, model, schedule, cond, 0.0, "v")

    def conditional_only(x, t):
        out = jax.vmap(lambda *a: model.apply(params, *a))(
            x, t, cond, jnp.zeros(8, bool)
        )
        abar = schedule.alphas_cumprod[t][:, None]
        x0 = jnp.sqrt(abar) * x - jnp.sqrt(1 - abar) * out
        return jnp.sqrt(1 - abar) * x + jnp.sqrt(abar) * out, x0

    key = jax.random.key(5)
    a = diffusion.ddim_sample(guided, schedule, x_T, 20, 0.5, key)
    b = diffusion.ddim_sample(conditional_only, schedule, x_T, 20, 0.5, key)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    stronger = diffusion.guided_eps_fn(params, model, schedule, cond, 2.0, "v")
    c = diffusion.ddim_sample(stronger, schedule, x_T, 20, 0.5, key)
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_dropped_condition_uses_the_null_vector(trained_toy):
    _, model, params, _ = trained_toy
    x, t = jnp.array([0.3, -0.1]), 50
    dropped = [model.apply(params, x, t, jnp.array([c]), True) for c in (0.0, 1.0)]
    kept = [model.apply(params, x, t, jnp.array([c]), False) for c in (0.0, 1.0)]
    np.testing.assert_array_equal(dropped[0], dropped[1])
    assert not np.allclose(kept[0], kept[1])

    def out_dropped(p):
        return jnp.sum(model.apply(p, x, t, jnp.array([1.0]), True))

    grads = jax.grad(out_dropped)(params)
    conditioner = grads["params"]["conditioner"]
    assert np.any(np.asarray(conditioner["null"]) != 0)
    assert np.all(np.asarray(conditioner["Dense_0"]["kernel"]) == 0)


def test_v_prediction_targets_and_recovery():
    schedule = diffusion.cosine_schedule(10)
    x0 = jnp.array([[1.0, -1.0]])
    noise = jnp.array([[0.5, 0.25]])
    t = jnp.array([4])
    xt = diffusion.add_noise(schedule, x0, t, noise)
    abar = schedule.alphas_cumprod[4]
    v = jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0
    np.testing.assert_allclose(
        xt, jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise, rtol=1e-6
    )
    # x0 and eps are recovered from (x_t, v) as guided_eps_fn does.
    np.testing.assert_allclose(
        jnp.sqrt(abar) * xt - jnp.sqrt(1 - abar) * v, x0, rtol=1e-5
    )
    np.testing.assert_allclose(
        jnp.sqrt(1 - abar) * xt + jnp.sqrt(abar) * v, noise, rtol=1e-5
    )


def test_clipping_bounds_x0_of_an_epsilon_model():
    schedule = diffusion.cosine_schedule(100)
    model = diffusion.Denoiser(
        latent_dim=2, num_tokens=1, width=8, depth=1, num_heads=1
    )
    params = model.init(jax.random.key(0), jnp.zeros(2), 0, jnp.zeros(1), False)
    # Push the output away from zero so x0 is large at high noise.
    params = jax.tree.map(lambda x: x + 0.5, params)
    cond = jnp.zeros((4, 1))
    x = jax.random.normal(jax.random.key(1), (4, 2))
    t = jnp.full((4,), 99)
    for clip in (None, 3.0):
        eps_fn = diffusion.guided_eps_fn(
            params, model, schedule, cond, 1.0, "epsilon", clip_x0=clip
        )
        eps, x0 = eps_fn(x, t)
        abar = schedule.alphas_cumprod[99]
        # eps and x0 always describe the same x_t.
        np.testing.assert_allclose(
            jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps, x, rtol=1e-3, atol=1e-3
        )
        if clip:
            assert np.all(np.abs(np.asarray(x0)) <= clip)
        else:
            assert np.any(np.abs(np.asarray(x0)) > 3.0)


def test_unet_denoiser_shapes_and_null_condition():
    model = diffusion.UNet1D(latent_dim=16, channels=(8, 16), width=16)
    params = model.init(jax.random.key(0), jnp.zeros(16), 0, jnp.zeros(2), False)
    # Give the zero-initialised output layers weights so the output can vary.
    params = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), params
    )
    x = jax.random.normal(jax.random.key(2), (16,))
    outs = {
        (c, drop): model.apply(params, x, 7, jnp.array([c, 0.5]), drop)
        for c in (0.0, 1.0)
        for drop in (False, True)
    }
    assert outs[(0.0, False)].shape == (16,)
    np.testing.assert_array_equal(outs[(0.0, True)], outs[(1.0, True)])
    assert not np.allclose(outs[(0.0, False)], outs[(1.0, False)])


def test_conditioner_groups_drop_independently():
    # Two groups (a 2-d descriptor and a 1-d return quantile): a dropped
    # group contributes its null vector whatever its value, a kept one not.
    model = diffusion.Conditioner(8, (2, 1))
    cond = jnp.array([0.2, 0.8, 0.0])
    params = model.init(jax.random.key(0), cond, jnp.array([False, False]))
    assert set(params["params"]) == {
        "null",
        "Dense_0",
        "Dense_1",
        "null_1",
        "Dense_in_1",
        "Dense_out_1",
    }
    other_return = cond.at[2].set(1.0)
    other_descriptor = cond.at[0].set(0.9)
    apply = lambda c, d: model.apply(params, c, jnp.asarray(d))
    np.testing.assert_allclose(
        apply(cond, [False, True]), apply(other_return, [False, True])
    )
    assert not np.allclose(
        apply(cond, [False, False]), apply(other_return, [False, False])
    )
    np.testing.assert_allclose(
        apply(cond, [True, False]), apply(other_descriptor, [True, False])
    )
    np.testing.assert_allclose(
        apply(cond, True), apply(other_return.at[0].set(0.9), True)
    )
    # One group keeps the one-group conditioner's parameter names.
    one = diffusion.Conditioner(8).init(jax.random.key(0), cond[:2], False)
    assert set(one["params"]) == {"null", "Dense_0", "Dense_1"}


def test_each_group_drops_at_its_own_rate():
    # The return rank's rate of 1 drops it from every example, so the loss no
    # longer sees its value; rate 0 keeps it. One rate for all groups draws
    # exactly the drops a scalar rate draws (workdirs made before per-group
    # rates train the same).
    schedule = diffusion.cosine_schedule(50)
    model = diffusion.Denoiser(
        latent_dim=4, num_tokens=2, width=16, depth=1, cond_groups=(2, 1)
    )
    params = model.init(
        jax.random.key(0), jnp.zeros(4), 0, jnp.zeros(3), jnp.zeros(2, bool)
    )
    # Away from the zero-initialised output layer, so the condition shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(
        tree,
        [
            x + 0.3 * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    x0 = jax.random.normal(jax.random.key(1), (32, 4))
    cond = jax.random.uniform(jax.random.key(2), (32, 3))
    other_return = cond.at[:, 2].set(1.0 - cond[:, 2])
    loss = lambda c, rates: diffusion.diffusion_loss(
        params, model, schedule, x0, c, jax.random.key(3), "v", rates
    )
    assert loss(cond, (0.0, 1.0)) == loss(other_return, (0.0, 1.0))
    assert loss(cond, (0.0, 0.0)) != loss(other_return, (0.0, 0.0))
    assert loss(cond, (0.3, 0.3)) == loss(cond, 0.3)
    c = ml_collections.ConfigDict({"cond_dropout": 0.1, "return_dropout": None})
    assert diffusion_train.group_dropouts(c, 2) == (0.1, 0.1)
    c.return_dropout = 0.5
    assert diffusion_train.group_dropouts(c, 2) == (0.1, 0.5)
    assert diffusion_train.group_dropouts(c, 1) == (0.1,)


def test_fourier_features_values_and_conditioner_input():
    x = jnp.array([0.25, 0.5])
    # Octaves 0 and 1: sin/cos of pi x, then of 2 pi x.
    expected = [
        0.25,
        0.5,
        *np.sin(np.pi * np.array([0.25, 0.5, 0.5, 1.0])),
        *np.cos(np.pi * np.array([0.25, 0.5, 0.5, 1.0])),
    ]
    np.testing.assert_allclose(diffusion.fourier_features(x, 2), expected, atol=1e-6)
    np.testing.assert_array_equal(diffusion.fourier_features(x, 0), x)
    # The conditioner widens each group's first layer to the features'
    # size; descriptors one grid cell apart (1/32) then differ in its input
    # by more than the raw 1/32.
    model = diffusion.Conditioner(8, (2, 1), frequencies=6)
    cond = jnp.array([0.2, 0.8, 1.0])
    params = model.init(jax.random.key(0), cond, jnp.array([False, False]))
    assert params["params"]["Dense_0"]["kernel"].shape == (2 * 13, 8)
    assert params["params"]["Dense_in_1"]["kernel"].shape == (13, 8)
    near = cond.at[0].add(1 / 32)
    gap = diffusion.fourier_features(near[:2], 6) - diffusion.fourier_features(
        cond[:2], 6
    )
    assert np.linalg.norm(gap) > 10 / 32
