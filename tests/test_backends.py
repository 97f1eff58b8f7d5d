"""Every documented env and backend gives a live feet-contact descriptor."""

import itertools

import jax
import numpy as np
import pytest

from lpd import policy as policy_lib
from lpd import qd
from lpd.config import load_config
from lpd.devices import batch_sharding


@pytest.mark.brax
@pytest.mark.parametrize(
    "env_name, backend", list(itertools.product(sorted(qd.ENVS), qd.BACKENDS))
)
def test_descriptor_is_not_degenerate(tiny_config_path, env_name, backend):
    # The tiny config's policies and episodes, its grid, random initial
    # policies: their descriptors must fill more than one cell and vary in
    # every dimension (QDax's contact test alone gave positional all zeros).
    c = load_config(f"{tiny_config_path}:{env_name}").archive
    env = qd.make_env(env_name, c.episode_length, backend)
    policy = policy_lib.Policy(tuple(c.policy_hidden_sizes), env.action_size)
    num = c.batch_size
    params = policy_lib.init_policies(
        policy, env.observation_size, num, jax.random.key(0)
    )
    scoring_fn = qd.make_scoring_fn(
        env, policy, c.episode_length, jax.random.key(1), batch_sharding(num)
    )
    _, descriptors, _ = jax.jit(scoring_fn)(params, jax.random.key(2))
    descriptors = np.asarray(descriptors)
    assert descriptors.shape == (num, len(qd.descriptor_names(env)))
    assert np.all((descriptors >= 0) & (descriptors <= 1))
    assert np.all(descriptors.std(axis=0) > 0), descriptors.std(axis=0)
    centroids = qd.make_centroids(
        "grid", tuple(c.grid_shape), 0, descriptors.shape[1], jax.random.key(0)
    )
    filled = qd.fill_archive(np.zeros(num), descriptors, centroids, 0.0)
    assert np.sum(np.isfinite(filled["cell_fitnesses"])) > 1
