"""The copy-and-perturb baselines on hand-made policies and scores."""

import jax
import jax.numpy as jnp
import numpy as np

from lpd import baselines


def _score(flat, key):
    # "Return" = the policy's first weight, "descriptor" = its first two.
    w = flat["params/w"]
    return w[:, 0], w[:, :2]


def test_noise_lands_at_the_asked_distance():
    flat = {"params/w": jnp.zeros((64, 400))}
    norm = lambda f, k: (jnp.linalg.norm(f["params/w"], axis=1), f["params/w"][:, :2])
    noisy = baselines.make_noisy_score(norm)
    norms, _ = noisy(flat, jax.random.key(0), 0.5)
    np.testing.assert_allclose(np.median(norms), 0.5 * np.sqrt(400), rtol=0.05)
    again, _ = noisy(flat, jax.random.key(0), 0.5)
    np.testing.assert_array_equal(norms, again)  # Deterministic in the key.
    other, _ = noisy(flat, jax.random.key(1), 0.5)
    assert not np.allclose(norms, other)


def test_baselines_reuse_the_evaluations_compile():
    # The perturbed and averaged weights come from jitted programs as device
    # arrays, the originals from the archive as host arrays; the evaluation's
    # score takes both to the host, so one compile of the rollout serves every
    # set.
    from lpd import evaluate_stage

    def eval_fn(params, key):
        w = params["params"]["w"]
        return w[:, 0], w[:, :2]

    score = evaluate_stage.make_score_fn(eval_fn)
    flat = {"params/w": np.arange(24.0, dtype=np.float32).reshape(4, 6)}
    score(flat, jax.random.key(0))
    baselines.make_noisy_score(score)(flat, jax.random.key(0), 0.1)
    mean = baselines.make_mean_score(score)
    mean(np.array([[0, 1], [1, 2], [2, 3], [3, 0]]), jax.random.key(0), flat)
    assert score.rollout._cache_size() == 1


def test_run_baselines_by_hand():
    # Elites on a line of descriptors; each one's weights are its index.
    stored = np.array([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [0.3, 0.0]], np.float32)
    flat = {"params/w": np.repeat(np.arange(4.0)[:, None], 3, axis=1)}
    uniform = np.array([[0.12, 0.0], [0.29, 0.0]], np.float32)

    def run(fn, inputs, which, name):
        out = fn(jax.tree.map(jnp.asarray, inputs), jax.random.key(1))
        return tuple(np.asarray(x) for x in out)

    # A QD score that prefers means of exactly 1 and 2 on the two asks.
    qd_score = lambda scored: -float(np.sum(np.abs(scored[0] - [1.0, 2.0])))
    result = baselines.run_baselines(
        run, _score, (flat, stored), (uniform, np.zeros(4), np.zeros(2), qd_score)
    )
    noise = result["elite_noise"]
    assert noise["sigma"] == 0.0  # Generated policies at distance 0: no noise.
    np.testing.assert_allclose(noise["archive"][0], [0, 1, 2, 3])
    np.testing.assert_allclose(noise["uniform"][0], [1, 3])  # Nearest elites.
    mean = result["neighbour_mean"]
    # Uniform asks: k = 2 gives 1.5, 2.5; k = 3 gives 1, 2; k = 4 gives 1.5, 1.5.
    assert mean["k"] == 3 and set(mean["uniform_qd_score_by_k"]) == {"2", "3", "4"}
    np.testing.assert_allclose(mean["uniform"][0], [1.0, 2.0])
    np.testing.assert_allclose(mean["archive"][0], [1.0, 1.0, 2.0, 2.0])
