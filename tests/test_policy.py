import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpd import policy as policy_lib


@pytest.mark.parametrize(
    "hidden, normalise, expected",
    [
        (
            (4,),
            False,
            {
                "params/Dense_0/kernel": (3, 4),
                "params/Dense_0/bias": (4,),
                "params/Dense_1/kernel": (4, 2),
                "params/Dense_1/bias": (2,),
            },
        ),
        (
            (5, 6),
            True,
            {
                "params/Dense_0/kernel": (3, 5),
                "params/Dense_0/bias": (5,),
                "params/Dense_1/kernel": (5, 6),
                "params/Dense_1/bias": (6,),
                "params/Dense_2/kernel": (6, 2),
                "params/Dense_2/bias": (2,),
                "params/obs_mean": (3,),
                "params/obs_log_std": (3,),
            },
        ),
    ],
)
def test_layout_and_count(hidden, normalise, expected):
    layout = policy_lib.policy_layout(policy_lib.Policy(hidden, 2, normalise), 3)
    assert layout == dict(sorted(expected.items()))
    template = policy_lib.layout_template(layout, (7,))
    assert policy_lib.count_params(template) == 7 * sum(
        int(np.prod(s)) for s in expected.values()
    )


def test_flatten_round_trip_and_batched_init():
    policy = policy_lib.Policy((4,), 2, True)
    params = policy_lib.init_policies(policy, 3, 5, jax.random.key(0))
    flat = policy_lib.flatten_params(params)
    assert all(v.shape[0] == 5 for v in flat.values())
    back = policy_lib.unflatten_params(flat)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    # Different keys give different policies.
    kernels = flat["params/Dense_0/kernel"]
    assert not np.allclose(kernels[0], kernels[1])


def test_normaliser_applies_mean_and_any_log_std_is_valid():
    policy = policy_lib.Policy((4,), 2, True)
    params = policy.init(jax.random.key(0), jnp.zeros(3))
    obs = jnp.array([1.0, 2.0, 3.0])
    shifted = jax.tree.map(lambda x: x, params)
    shifted["params"]["obs_mean"] = obs
    zero_obs = policy.apply(params, jnp.zeros(3))
    np.testing.assert_allclose(policy.apply(shifted, obs), zero_obs, rtol=1e-6)
    # The scale is exp(log_std): every value, however mutated, is a valid
    # (positive) scale, and a tiny one is floored, so no inf or NaN.
    for log_std in (-40.0, -3.0, 5.0):
        varied = jax.tree.map(lambda x: x, params)
        varied["params"]["obs_log_std"] = jnp.full(3, log_std)
        assert np.all(np.isfinite(policy.apply(varied, obs)))
    scaled = jax.tree.map(lambda x: x, params)
    scaled["params"]["obs_log_std"] = jnp.full(3, np.log(2.0))
    np.testing.assert_allclose(
        policy.apply(scaled, 2.0 * obs), policy.apply(params, obs), rtol=1e-5
    )
    actions = policy.apply(params, 100.0 * obs)
    assert np.all(np.abs(actions) <= 1.0)


def test_normaliser_gets_no_gradient():
    policy = policy_lib.Policy((4,), 2, True)
    params = policy.init(jax.random.key(0), jnp.zeros(3))
    grads = jax.grad(lambda p: jnp.sum(policy.apply(p, jnp.ones(3))))(params)
    assert np.all(grads["params"]["obs_mean"] == 0)
    assert np.all(grads["params"]["obs_log_std"] == 0)
    assert np.any(grads["params"]["Dense_0"]["kernel"] != 0)
