"""Behaviour sequencing: chunking, per-chunk metrics, policy swaps, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpd import archive, archive_io, generator, rollouts, sequence
from lpd import policy as policy_lib
from lpd.cli import main
from lpd.errors import LpdError


def test_chunks_are_consecutive_and_near_equal():
    chunks = sequence.chunk_index(10, 3)
    np.testing.assert_array_equal(chunks, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    sizes = np.bincount(sequence.chunk_index(250, 4))
    assert sizes.sum() == 250 and sizes.max() - sizes.min() <= 1


def test_chunk_metrics_by_hand():
    chunks = np.array([0, 0, 1, 1])
    rewards = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    contacts = np.array([[[1.0], [0.0], [1.0], [1.0]], [[1.0], [1.0], [0.0], [5.0]]])
    # Seed 1 ends at step 2: step 2 counts, step 3 does not.
    dones = np.array([[0, 0, 0, 0], [0, 0, 1, 1]])
    m = sequence.chunk_metrics(rewards, contacts, dones, chunks, 2)
    np.testing.assert_array_equal(m["returns"], [[3.0, 7.0], [2.0, 1.0]])
    np.testing.assert_array_equal(m["descriptors"][..., 0], [[0.5, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(m["alive_steps"], [4, 3])


def test_chunk_metrics_leave_the_settling_steps_out_of_the_contact_only():
    chunks = np.array([0, 0, 0, 1, 1, 1])
    rewards = np.ones((2, 6))
    contacts = np.array([[1.0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 1]])[..., None]
    # Seed 1 ends at step 3, the first step of chunk 1: a settling step.
    dones = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    m = sequence.chunk_metrics(rewards, contacts, dones, chunks, 2, settle=1)
    np.testing.assert_array_equal(m["returns"], [[3, 3], [3, 1]])
    np.testing.assert_array_equal(m["descriptors"][0, :, 0], [0.0, 0.5])
    assert m["descriptors"][1, 0, 0] == 1.0 and np.isnan(m["descriptors"][1, 1, 0])
    np.testing.assert_array_equal(m["alive_steps"], [6, 4])


def test_benchmark_asks_what_the_elites_reach_and_settling_changes_only_errors(
    tiny_diffusion,
):
    meta = archive_io.load_meta(tiny_diffusion)
    archive_data, _ = archive_io.load_archive(tiny_diffusion)
    _, flat = archive_io.elites(archive_data)
    reachable = sequence.reachable_descriptors(meta, flat, jax.random.key(0))
    assert 0 < len(reachable) <= len(next(iter(flat.values())))
    assert np.all((reachable >= 0) & (reachable <= 1))
    options = dict(sequences=4, chunks=2, chunk_steps=None, seed=0, guidance=None)
    options.update(candidates=1, replan=25, horizon=10)
    options["return"] = None
    runs = [
        sequence.run_benchmark(tiny_diffusion, {**options, "settle": settle})
        for settle in (0, 40)
    ]
    length = meta["episode_length"]
    for run in runs:
        assert run["chunk_steps"] == length and run["sequences"] == 4
        assert run["success_threshold_steps"] == 0.8 * 2 * length
        for method in ("generated", "nearest_elite"):
            m = run[method]
            assert 0 <= m["success"] <= 1 and 0 < m["mean_episode_steps"] <= 2 * length
            assert len(m["measure_error_per_chunk"]) == len(m["reached_per_chunk"]) == 2
    for method in ("generated", "nearest_elite"):  # Same episodes, other windows.
        a, b = runs[0][method], runs[1][method]
        assert (a["success"], a["mean_return"]) == (b["success"], b["mean_return"])
        assert np.all(np.subtract(a["reached_per_chunk"], b["reached_per_chunk"]) >= 0)
        assert a["measure_error"] != b["measure_error"]
    with pytest.raises(LpdError, match="--settle"):
        sequence.run_benchmark(tiny_diffusion, {**options, "settle": length})
    # A look-ahead over 3 candidates asked for the top return: the same
    # metrics, and its settings.
    ahead = sequence.run_benchmark(
        tiny_diffusion, {**options, "candidates": 3, "settle": 0, "return": 1.0}
    )
    assert (ahead["candidates"], ahead["replan_steps"], ahead["horizon_steps"]) == (
        3,
        25,
        10,
    )
    assert ahead["return"] == 1.0 and runs[0]["return"] is None
    for method in ("generated", "nearest_elite"):
        m = ahead[method]
        assert 0 <= m["success"] <= 1 and 0 < m["mean_episode_steps"] <= 2 * length
    with pytest.raises(LpdError, match="--replan must divide"):
        sequence.run_benchmark(
            tiny_diffusion, {**options, "candidates": 2, "replan": 7, "settle": 0}
        )


def test_generated_policies_take_the_return_ask(tiny_diffusion):
    gen = generator.load_generator(tiny_diffusion)
    archive_data, _ = archive_io.load_archive(tiny_diffusion)
    _, flat = archive_io.elites(archive_data)
    asks = (np.full((2, 1, 2), 0.5), np.zeros((2, 1), np.int32))
    key = jax.random.key(0)
    kernel = lambda top: np.asarray(
        sequence._policies(gen, 0.0, asks, flat, key, top)["generated"]["params"][
            "Dense_0"
        ]["kernel"]
    )
    plain, best = kernel(None), kernel(1.0)
    assert plain.shape[:2] == (2, 1) and not np.allclose(plain, best)
    np.testing.assert_array_equal(best, kernel(1.0))  # Same key, same policies.


def _constant_policies(layout, biases):
    """Flat parameters of policies with zero weights and output bias b: each
    always acts tanh(b)."""
    last = max(p for p in layout if p.endswith("/bias"))
    return {
        p: jnp.zeros((*biases.shape[:-1], *shape))
        if p != last
        else biases * jnp.ones(shape)
        for p, shape in layout.items()
    }


def test_rollout_swaps_policies_at_chunk_boundaries(tiny_archive):
    # Recorded parameters: policy k has zero weights and output bias b_k, so
    # it always acts tanh(b_k); the actions show which policy acted when.
    meta = archive_io.load_meta(tiny_archive)
    env, policy = archive.make_task(meta)
    biases = jnp.asarray([-0.5, 0.1, 0.7])
    flat = _constant_policies(meta["layout"], biases[:, None])
    chunks = sequence.chunk_index(env.episode_length, 3)
    out = rollouts.rollout(
        env, policy, policy_lib.unflatten_params(flat), chunks, jax.random.key(0)
    )
    expected = np.tanh(np.asarray(biases))[chunks]
    np.testing.assert_allclose(
        np.asarray(out["actions"]),
        expected[:, None] * np.ones((1, env.action_size)),
        rtol=1e-6,
    )


def test_lookahead_picks_the_candidate_its_own_rollouts_score_best(tiny_archive):
    meta = archive_io.load_meta(tiny_archive)
    env, policy = archive.make_task(meta)
    steps, horizon = env.episode_length, 20
    biases = jnp.asarray([[-0.9], [0.0], [0.6], [0.95]])  # 2 chunks x 2 candidates.
    flat = _constant_policies(meta["layout"], biases)
    asks = jnp.full((2, len(meta["descriptor_names"])), 0.5)
    segments = np.repeat([0, 1], 5)
    key = jax.random.key(0)
    out = rollouts.lookahead_rollout(
        env,
        policy,
        policy_lib.unflatten_params(
            {p: x.reshape(2, 2, *x.shape[1:]) for p, x in flat.items()}
        ),
        asks,
        segments,
        horizon,
        key,
    )
    # The first segment starts from the reset: score the chunk's candidates
    # on rollouts of their own from the same reset.
    scores = []
    for c in range(2):
        alone = rollouts.rollout(
            env,
            policy,
            policy_lib.unflatten_params({p: x[c : c + 1] for p, x in flat.items()}),
            np.zeros(steps, np.int32),
            key,
        )
        dones = np.asarray(alone["dones"][:horizon])
        up = np.cumprod(1 - dones)
        contact = (up[:, None] * np.asarray(alone["contacts"][:horizon])).sum(0)
        contact /= max(up.sum(), 1)
        width = 2 * np.sqrt(asks.shape[1])
        scores.append(up.sum() - np.linalg.norm(contact - 0.5) / width)
    assert scores[0] != scores[1]
    picked = np.asarray(out["picked"])
    assert picked.shape == (10,) and picked[0] == np.argmax(scores)
    seg = steps // 10
    acted = np.tanh(np.asarray(biases)[2 * segments + picked, 0])
    np.testing.assert_allclose(
        np.asarray(out["actions"])[:, 0], np.repeat(acted, seg), rtol=1e-6
    )
    # Identical candidates: the look-ahead leaves the episode as it was.
    same = policy_lib.unflatten_params(
        {p: jnp.broadcast_to(x[1], (2, 3, *x.shape[1:])) for p, x in flat.items()}
    )
    ahead = rollouts.lookahead_rollout(env, policy, same, asks, segments, horizon, key)
    plain = rollouts.rollout(
        env,
        policy,
        policy_lib.unflatten_params({p: x[1:2] for p, x in flat.items()}),
        np.zeros(steps, np.int32),
        key,
    )
    for name in ("rewards", "contacts", "dones", "actions"):
        np.testing.assert_allclose(ahead[name], plain[name], rtol=1e-6, atol=1e-6)


def test_sequence_cli_writes_report_plot_and_viewer(tiny_run, tmp_path, capsys):
    out = tmp_path / "seq"
    argv = ["sequence", "--workdir", str(tiny_run), "--descriptors", "0.1,0.9;0.9,0.1"]
    code = main([*argv, "--seeds", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "sequence.json").read_text())
    assert summary["asked"] == [[0.1, 0.9], [0.9, 0.1]]
    assert (
        sum(summary["chunk_steps"])
        == json.loads((tiny_run / "archive" / "meta.json").read_text())[
            "episode_length"
        ]
    )
    for name in ("generated", "nearest_elites"):
        assert len(summary[name]["chunks"]) == 2
        assert 0.0 <= summary[name]["success_rate"] <= 1.0
    assert (out / "contacts.png").stat().st_size > 0
    assert "viewer" in (out / "episode.html").read_text()
    assert "success" in printed
    again = tmp_path / "again"
    assert main([*argv, "--seeds", "4", "--out", str(again)]) == 0
    assert json.loads((again / "sequence.json").read_text()) == summary  # Same seed.
    ahead = tmp_path / "ahead"
    look = ["--candidates", "3", "--replan", "25", "--horizon", "10"]
    look += ["--return", "top"]
    assert main([*argv, "--seeds", "4", *look, "--out", str(ahead)]) == 0
    summary = json.loads((ahead / "sequence.json").read_text())
    assert summary["chunk_steps"] == [25, 25]  # The chunks start on re-picks.
    assert (summary["candidates"], summary["replan_steps"]) == (3, 25)
    assert summary["return"] == 1.0
    assert summary["nearest_elite_descriptors"][0] == pytest.approx(
        json.loads((out / "sequence.json").read_text())["nearest_elite_descriptors"][0]
    )
    assert "viewer" in (ahead / "episode.html").read_text()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--candidates", "0"], "--candidates must be > 0"),
        (["--candidates", "2", "--replan", "7"], "--replan must divide"),
        (["--candidates", "2", "--horizon", "0"], "--horizon be > 0"),
        (["--candidates", "2", "--replan", "50"], "at most 1 chunks"),
        (["--return", "best"], "--return must be 'top' or a quantile"),
    ],
)
def test_sequence_lookahead_errors(tiny_run, tmp_path, capsys, extra, fragment):
    out = tmp_path / "seq"
    argv = ["sequence", "--workdir", str(tiny_run), "--descriptors", "0.1,0.9;0.9,0.1"]
    assert main([*argv, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "descriptors, fragment",
    [
        ("", "give descriptors as"),
        ("0.1,0.9;;0.5,0.5", "give descriptors as"),
        ("0.1,0.9;0.5", "descriptors have 1 values"),
        ("0.1,1.5", "must lie in"),
        ("a,b", "not comma-separated numbers"),
    ],
)
def test_sequence_errors(tiny_run, tmp_path, capsys, descriptors, fragment):
    out = tmp_path / "seq"
    argv = ["sequence", "--workdir", str(tiny_run), "--descriptors", descriptors]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "\n" not in err, err
    assert not out.exists()


def test_sequence_by_texts(tiny_run, tmp_path, capsys):
    out = tmp_path / "seq"
    texts = "hop on the left foot|walk with an even gait"
    argv = ["sequence", "--workdir", str(tiny_run), "--texts", texts]
    code = main([*argv, "--seeds", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "sequence.json").read_text())
    assert summary["texts"] == texts.split("|")
    all_labels = {
        t
        for e in json.loads((tiny_run / "text" / "labels.json").read_text())["labels"]
        for t in e["texts"]
    }
    assert set(summary["matched_labels"]) <= all_labels
    # The baseline elites are the reference descriptors of the chunks.
    assert summary["asked"] == summary["nearest_elite_descriptors"]
    assert len(summary["generated"]["chunks"]) == 2
    assert "closest label" in printed
    ahead = tmp_path / "ahead"
    look = ["--candidates", "2", "--replan", "25", "--horizon", "10"]
    assert main([*argv, "--seeds", "2", *look, "--out", str(ahead)]) == 0
    again = json.loads((ahead / "sequence.json").read_text())
    assert again["matched_labels"] == summary["matched_labels"]
    assert again["asked"] == again["nearest_elite_descriptors"] == summary["asked"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--texts", "hop||walk"], "give non-empty sentences"),
        (["--texts", " "], "give non-empty sentences"),
        (["--texts", "hop", "--descriptors", "0.5,0.5"], "exactly one of"),
        ([], "exactly one of"),
    ],
)
def test_sequence_text_errors(tiny_run, tmp_path, capsys, extra, fragment):
    out = tmp_path / "seq"
    code = main(["sequence", "--workdir", str(tiny_run), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "\n" not in err, err
    assert not out.exists()
