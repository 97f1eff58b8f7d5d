"""Automatic labels: every elite, several phrasings, outcomes, determinism."""

import json

import numpy as np
import pytest

from lpd import labels
from lpd.errors import LpdError

NAMES = ["foot", "foot_left"]  # walker2d: right, left.


def _archive(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 2)), rng.uniform(0, 500, n), rng.uniform(0.5, 1, n)


def test_every_elite_gets_distinct_phrasings_deterministically():
    d, r, f = _archive()
    texts = labels.make_labels(d, r, f, NAMES)
    assert len(texts) == len(d)
    for t in texts:
        assert len(t) == labels.PHRASINGS and len(set(t)) == labels.PHRASINGS
        assert all(s.strip() for s in t)
    assert labels.make_labels(d, r, f, NAMES) == texts


def test_failures_are_labelled_and_successes_say_so():
    d, r, f = _archive()
    for texts, fraction in zip(labels.make_labels(d, r, f, NAMES), f, strict=True):
        joined = " | ".join(texts)
        if fraction < labels.FELL:
            assert "fall over" in joined and "without falling" not in joined
        else:
            assert "without falling" in joined and "fall over" not in joined


def test_contact_patterns_name_the_right_foot():
    texts = labels.make_labels(
        np.array([[0.1, 0.9], [0.9, 0.1], [0.9, 0.9], [0.5, 0.5]]),
        np.ones(4),
        np.ones(4),
        NAMES,
    )
    assert texts[0][0].startswith("hop on the left foot")
    assert texts[1][0].startswith("hop on the right foot")
    assert "both feet" in texts[2][0]
    assert "even" in texts[3][0]


def test_speed_follows_the_return_thirds():
    d = np.full((3, 2), 0.5)
    texts = labels.make_labels(d, np.array([1.0, 50.0, 100.0]), np.ones(3), NAMES)
    assert "slowly" in texts[0][0] and "quickly" in texts[2][0]
    assert "slowly" not in texts[1][0] and "quickly" not in texts[1][0]


@pytest.mark.parametrize("names", [["foot"], ["leg_1", "leg_2", "leg_3", "leg_4"]])
def test_other_bodies_are_labelled(names):
    d = np.random.default_rng(1).uniform(0, 1, (5, len(names)))
    texts = labels.make_labels(d, np.arange(5.0), np.ones(5), names)
    assert all(len(t) == labels.PHRASINGS for t in texts)


def test_label_file_round_trip_and_errors(tmp_path):
    d, r, f = _archive(5)
    cells = np.array([3, 7, 11, 12, 20])
    texts = labels.make_labels(d, r, f, NAMES)
    path = tmp_path / "labels.json"
    labels.write_labels(path, cells, texts)
    assert labels.read_labels(path, cells) == texts
    with pytest.raises(LpdError, match="no text for 1 elites"):
        labels.read_labels(path, np.append(cells, 99))
    with pytest.raises(LpdError, match=r"hold no elite \(\[12, 20\]\)"):
        labels.read_labels(path, cells[:3])
    (tmp_path / "bad.json").write_text(json.dumps({"labels": [{"cell": 3}]}))
    with pytest.raises(LpdError, match="cannot read labels"):
        labels.read_labels(tmp_path / "bad.json", cells)
    twice = {"labels": [{"cell": 3, "texts": ["a"]}, {"cell": 3, "texts": ["b"]}]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(LpdError, match=r"names cells \[3\] more than once"):
        labels.read_labels(tmp_path / "twice.json", np.array([3]))


@pytest.mark.parametrize(
    "names", [NAMES, ["foot"], ["leg_1", "leg_2", "leg_3", "leg_4"]]
)
def test_metric_prompts_match_labels_except_the_paraphrases(names):
    """Label phrases are what the labels say inside their region; paraphrases
    occur in no label anywhere."""
    grid = np.linspace(0.0, 1.0, 11)
    every = np.stack(np.meshgrid(*[grid] * len(names)), -1).reshape(-1, len(names))
    all_texts = " | ".join(
        t
        for ts in labels.make_labels(
            every, np.arange(len(every)), np.linspace(0, 1, len(every)), names
        )
        for t in ts
    )
    prompts = labels.metric_prompts(names)
    assert len(prompts) == (10 if len(names) == 2 else 6)
    for p in prompts:
        assert len(p["low"]) == len(p["high"]) == len(names)
        assert (p["prompt"] in all_texts) != p["paraphrase"], p
        if not p["paraphrase"]:
            inside = every[labels.in_region(every, p["low"], p["high"])]
            # Off the region edges, where the labels' levels are strict.
            clear = inside[~np.any(np.isin(inside.round(6), [0.3, 0.7]), axis=1)]
            assert len(clear)
            for contact in clear:
                said = labels.describe(contact, names, "", False)[0]
                assert said.startswith(p["prompt"]), (contact, said)


def test_in_region_is_inclusive_per_dimension():
    d = np.array([[0.7, 0.3], [0.69, 0.3], [0.8, 0.31], [1.0, 0.0]])
    np.testing.assert_array_equal(
        labels.in_region(d, [0.7, 0.0], [1.0, 0.3]), [True, False, False, True]
    )
