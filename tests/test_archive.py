"""The archive stage end to end on the tiny config (Brax rollouts)."""

import json

import jax
import numpy as np
import pytest

from lpd import archive, archive_io, logs
from lpd.config import load_config
from lpd.errors import LpdError

pytestmark = pytest.mark.brax


def _assert_same_archive(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_short_run_increases_coverage(tiny_archive):
    rows = logs.read_metrics(tiny_archive / "archive")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["coverage"] > rows[0]["coverage"]
    assert rows[-1]["max_fitness"] >= rows[0]["max_fitness"]


def test_artifact_holds_archive_and_metadata(tiny_archive):
    data, meta = archive_io.load_archive(tiny_archive)
    cells = meta["num_cells"]
    assert cells == 25 and data.centroids.shape == (cells, 2)
    assert data.fitnesses.shape == (cells,) and data.descriptors.shape == (cells, 2)
    assert meta["num_elites"] == int(np.sum(np.isfinite(data.fitnesses)))
    kernel = data.params["params"]["Dense_0"]["kernel"]
    assert kernel.shape == (cells, meta["policy"]["obs_size"], 8)
    assert meta["layout"]["params/Dense_1/kernel"] == [8, meta["policy"]["action_size"]]
    assert meta["env"] == "walker2d_uni" and meta["descriptor_names"] == [
        "foot",
        "foot_left",
    ]
    assert meta["fitness_offset"] > 0 and meta["versions"]["qdax"] == "0.5.0"
    filled = np.isfinite(data.fitnesses)
    assert np.all((data.descriptors[filled] >= 0) & (data.descriptors[filled] <= 1))
    reeval = meta["reevaluation"]
    assert reeval["episodes"] == 8 and reeval["stored_cells"] == meta["num_elites"]
    assert 0 < reeval["filled_cells"] <= reeval["stored_cells"]
    assert 0.0 <= reeval["stayed_up_fraction"] <= 1.0
    assert np.isfinite(reeval["mean_return"])
    assert (tiny_archive / "archive" / "heatmap.png").stat().st_size > 1000
    assert list((tiny_archive / "archive" / "tensorboard").iterdir())


def test_resume_after_interruption_equals_uninterrupted_run(
    tiny_archive, tiny_config_path, tmp_path, run_killed_after, caplog
):
    config = load_config(tiny_config_path)
    # Step 0 is the initial population; step 2 ends the first chunk.
    run_killed_after(2, lambda: archive.run_archive_stage(config, tmp_path))
    assert not (tmp_path / "archive" / "meta.json").exists()

    with caplog.at_level("INFO"):
        archive.run_archive_stage(config, tmp_path)
    assert "resuming from iteration 2" in caplog.text  # Not a fresh start.
    resumed, _ = archive_io.load_archive(tmp_path)
    uninterrupted, _ = archive_io.load_archive(tiny_archive)
    _assert_same_archive(resumed, uninterrupted)
    assert logs.read_metrics(tmp_path / "archive") == logs.read_metrics(
        tiny_archive / "archive"
    )


def test_complete_stage_is_skipped(tiny_archive, tiny_config_path, caplog):
    meta = tiny_archive / "archive" / "meta.json"
    before = meta.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        archive.run_archive_stage(load_config(tiny_config_path), tiny_archive)
    assert "skipping" in caplog.text
    assert meta.stat().st_mtime_ns == before


def test_export_import_round_trip(tiny_archive, tmp_path):
    out = archive_io.export_npz(tiny_archive, tmp_path / "a.npz")
    with np.load(out, allow_pickle=False) as data:
        assert "params/Dense_0/kernel" in data.files
        assert json.loads(str(data["metadata"]))["env"] == "walker2d_uni"
    meta = archive.import_archive(out, tmp_path / "w")
    assert meta["source"] == "imported from a.npz"
    reloaded, meta2 = archive_io.load_archive(tmp_path / "w")
    original, meta1 = archive_io.load_archive(tiny_archive)
    _assert_same_archive(reloaded, original)
    for key in ("env", "layout", "descriptor_names", "fitness_offset", "num_elites"):
        assert meta2[key] == meta1[key]


def test_ant_descriptor_has_four_feet_that_change_with_the_gait():
    from lpd import policy as policy_lib
    from lpd import qd
    from lpd.devices import batch_sharding

    env = qd.make_env("ant_uni", 100, "spring")
    assert env.descriptor_length == 4
    policy = policy_lib.Policy((16,), env.action_size)
    params = policy_lib.init_policies(
        policy, env.observation_size, 8, jax.random.key(1)
    )
    # Scale the weights so that the policies differ strongly in their gaits.
    params = jax.tree.map(lambda x: 4.0 * x, params)
    scoring_fn = qd.make_scoring_fn(
        env, policy, 100, jax.random.key(0), batch_sharding(8)
    )
    _, descriptors, _ = jax.jit(scoring_fn)(params, jax.random.key(2))
    descriptors = np.asarray(descriptors)
    assert descriptors.shape == (8, 4)
    assert np.all((descriptors >= 0) & (descriptors <= 1))
    assert np.all(descriptors.std(axis=0) > 0.01), descriptors  # every foot varies
    assert len(np.unique(descriptors.round(3), axis=0)) > 4


def test_scoring_on_several_episodes_averages_random_starts():
    from lpd import policy as policy_lib
    from lpd import qd
    from lpd.devices import batch_sharding

    env = qd.make_env("walker2d_uni", 50, "spring")
    policy = policy_lib.Policy((8,), env.action_size)
    params = policy_lib.init_policies(
        policy, env.observation_size, 4, jax.random.key(1)
    )
    keys = jax.random.key(2), jax.random.key(3)

    def score(num_episodes, key):
        fn = qd.make_scoring_fn(
            env, policy, 50, jax.random.key(0), batch_sharding(4), num_episodes
        )
        fitnesses, descriptors, _ = jax.jit(fn)(params, key)
        return np.asarray(fitnesses), np.asarray(descriptors)

    # One episode: QDax's fixed start, whatever the call's key.
    np.testing.assert_array_equal(score(1, keys[0])[0], score(1, keys[1])[0])
    # Three: random starts from the call's key, averaged per policy.
    fitnesses, descriptors = score(3, keys[0])
    assert fitnesses.shape == (4,) and descriptors.shape == (4, 2)
    assert not np.allclose(fitnesses, score(3, keys[1])[0])
    episodes = qd.episodes_scoring_fn(env, policy, 50, 3, batch_sharding(4))
    each, _, _ = jax.jit(episodes)(params, keys[0])
    np.testing.assert_allclose(fitnesses, np.asarray(each).mean(axis=1), rtol=1e-6)


def test_search_on_longer_episodes_than_the_protocol(tiny_config_path, tmp_path):
    from lpd import policy as policy_lib
    from lpd import qd
    from lpd.devices import batch_sharding

    config = load_config(
        tiny_config_path,
        [
            "--config.archive.search_episode_length=100",
            "--config.archive.num_iterations=2",
            "--config.archive.reeval_episodes=2",
        ],
    )
    archive.run_archive_stage(config, tmp_path)
    data, meta = archive_io.load_archive(tmp_path)
    assert meta["search_episode_length"] == 100 and meta["episode_length"] == 50
    assert meta["fitness_offset"] == qd.fitness_offset("walker2d_uni", 50)
    idx, flat = archive_io.elites(data)
    stored = np.asarray(data.fitnesses)[idx]

    # The stored returns are QDax's fixed-start scores over the search's 100
    # steps, not the protocol's 50.
    def score(length):
        env = qd.make_env("walker2d_uni", length, "spring")
        policy = policy_lib.Policy((8,), env.action_size)
        start = jax.random.fold_in(jax.random.key(config.seed), 0)
        fn = qd.make_scoring_fn(env, policy, length, start, batch_sharding(1))
        genotypes = policy_lib.unflatten_params(flat)
        return np.asarray(jax.jit(fn)(genotypes, jax.random.key(0))[0])

    np.testing.assert_allclose(stored, score(100), rtol=1e-4, atol=1e-3)
    assert not np.allclose(stored, score(50), rtol=1e-2)
    # The closing check re-runs them on the protocol's length (meta's 50).
    again = archive.reevaluate(data, meta, config.archive, jax.random.key(config.seed))
    assert again == meta["reevaluation"]
    assert 0 < again["filled_cells"] <= len(idx)
    with pytest.raises(LpdError, match="search_episode_length must be > 0"):
        archive.validate(
            load_config(tiny_config_path, ["--config.archive.search_episode_length=0"])
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # PGA-ME with an observation normaliser, shrunk to compile quickly.
        [
            "--config.archive.emitter=pga_me",
            "--config.archive.normalise_obs=true",
            "--config.archive.pga.replay_buffer_size=2000",
            "--config.archive.pga.critic_hidden_layer_size=(16,16)",
            "--config.archive.pga.num_critic_training_steps=2",
            "--config.archive.pga.num_pg_training_steps=2",
            "--config.archive.pga.batch_size=8",
        ],
        # A 1-D descriptor on CVT cells, each offspring scored from 2 random
        # starts, with an observation normaliser fitted on those episodes.
        [
            "--config.archive.tessellation=cvt",
            "--config.archive.scoring_episodes=2",
            "--config.archive.normalise_obs=true",
        ],
    ],
    ids=["pga_me-normalised", "hopper-cvt-robust"],
)
def test_variants_run_and_fill_cells(tiny_config_path, tmp_path, overrides):
    arg = ":hopper_uni" if "cvt" in overrides[0] else ""
    config = load_config(tiny_config_path + arg, overrides)
    archive.run_archive_stage(config, tmp_path)
    data, meta = archive_io.load_archive(tmp_path)
    rows = logs.read_metrics(tmp_path / "archive")
    assert rows[-1]["coverage"] >= rows[0]["coverage"] > 0
    assert meta["num_elites"] == int(np.sum(np.isfinite(data.fitnesses))) > 0
    filled = np.isfinite(data.fitnesses)
    log_std = np.asarray(data.params["params"]["obs_log_std"])[filled]
    assert log_std.shape[1] == meta["policy"]["obs_size"]
    assert not np.allclose(log_std, 0.0)  # fitted from rollouts, not the default
    if config.archive.tessellation == "cvt":
        assert data.centroids.shape == (16, 1)


# DCRL-ME shrunk to compile quickly: 4 policy-gradient and 4 actor-injected
# offspring of the tiny batch's 16, a small critic and buffer.
DCRL_OVERRIDES = [
    "--config.archive.emitter=dcrl_me",
    "--config.archive.dcrl.dcrl_batch_size=4",
    "--config.archive.dcrl.ai_batch_size=4",
    "--config.archive.dcrl.replay_buffer_size=2000",
    "--config.archive.dcrl.critic_hidden_layer_size=(16,16)",
    "--config.archive.dcrl.num_critic_training_steps=2",
    "--config.archive.dcrl.num_pg_training_steps=2",
    "--config.archive.dcrl.batch_size=8",
    "--config.archive.reeval_episodes=2",
]


@pytest.mark.slow
def test_dcrl_me_resumes_and_saves_its_actor(
    tiny_config_path, tmp_path, run_killed_after
):
    from lpd import policy as policy_lib
    from lpd import qd

    config = load_config(tiny_config_path, DCRL_OVERRIDES)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    archive.run_archive_stage(config, whole)
    run_killed_after(2, lambda: archive.run_archive_stage(config, resumed))
    archive.run_archive_stage(config, resumed)
    data, meta = archive_io.load_archive(whole)
    _assert_same_archive(archive_io.load_archive(resumed)[0], data)
    actor = archive_io.load_actor(whole)
    _assert_same_archive(archive_io.load_actor(resumed), actor)
    assert meta["num_elites"] > 0 and meta["actor"]["kind"] == "dcrl_me"
    obs_size, dims = meta["policy"]["obs_size"], len(meta["descriptor_names"])
    kernel = actor["params"]["Dense_0"]["kernel"]
    assert kernel.shape == (obs_size + dims, 8)
    assert meta["actor"]["params"] == policy_lib.count_params(actor)

    # Conditioned on a descriptor, the actor is a policy of the archive's kind:
    # its actions are the actor's on the observation and the descriptor
    # scaled to [-1, 1].
    env, policy = archive.make_task(meta)
    asks = np.array([[0.1, 0.9], [0.7, 0.3]], np.float32)
    obs = np.random.default_rng(0).normal(size=(2, obs_size)).astype(np.float32)
    policies = qd.actor_as_policies(actor, asks)
    as_policy = jax.vmap(policy.apply)(policies, obs)
    direct = qd.dcrl_actor(policy).apply(actor, obs, 2 * asks - 1)
    np.testing.assert_allclose(as_policy, direct, rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        as_policy[0], qd.dcrl_actor(policy).apply(actor, obs[0], 2 * asks[1] - 1)
    )  # The descriptor changes the actions.

    # The npz export carries the actor under its own keys; an import keeps it.
    out = archive_io.export_npz(whole, tmp_path / "dcrl.npz")
    with np.load(out, allow_pickle=False) as npz:
        assert "actor/params/Dense_0/kernel" in npz.files
    archive.import_archive(out, tmp_path / "imported")
    _assert_same_archive(archive_io.load_actor(tmp_path / "imported"), actor)
    # An actor whose first layer lacks the descriptor rows is refused.
    with np.load(out, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["actor/params/Dense_0/kernel"] = arrays["actor/params/Dense_0/kernel"][
        :obs_size
    ]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(LpdError, match="do not match a DCRL actor"):
        archive.import_archive(tmp_path / "bad.npz", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
