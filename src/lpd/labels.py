"""Text labels for elites, from their foot contact, return and outcome.

Each elite gets ``PHRASINGS`` sentences that say the same thing in
different words ("hop on the left foot", "move using mostly the left leg",
...), with how fast it goes (its return's third within the archive) and
whether it stays up ("... without falling") or falls ("..., then fall
over"). Everything is a pure function of the inputs: deterministic.

A user's own labels use the same file format (:func:`read_labels`): JSON
``{"labels": [{"cell": <archive cell>, "texts": ["...", ...]}, ...]}`` with
one entry per elite and at least one non-empty text each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lpd.errors import LpdError
from lpd.workdir import write_text

LOW, HIGH = 0.3, 0.7  # Contact fraction below / above: foot mostly up / down.
FELL = 0.8  # An episode shorter than this fraction of the maximum fell.
PHRASINGS = 3
SIDES = {  # Descriptor name -> the foot's name in words.
    "foot": "right",  # walker2d's feet are "foot" and "foot_left".
    "foot_left": "left",
    "bfoot": "back",
    "ffoot": "front",
    "right_shin": "right",
    "left_shin": "left",
}


def _word(name: str) -> str:
    """A foot's name in words: "left", "back", or the link name spelled out."""
    return SIDES.get(name, name.replace("_", " "))


def _level(x: float) -> str:
    return "up" if x < LOW else "down" if x > HIGH else "mid"


def _two_feet(contact, names) -> list[str]:
    a, b = (_word(n) for n in names)
    la, lb = (_level(x) for x in contact)
    one_down = {
        ("down", "up"): (a, b),
        ("up", "down"): (b, a),
    }
    if (la, lb) in one_down:
        down, up = one_down[(la, lb)]
        return [
            f"hop on the {down} foot",
            f"move using mostly the {down} leg",
            f"keep the {down} foot on the ground and the {up} foot raised",
        ]
    if (la, lb) == ("down", "down"):
        return [
            "shuffle forward with both feet",
            "walk keeping both feet on the ground",
            "drag both feet along the ground",
        ]
    if (la, lb) == ("up", "up"):
        return [
            "leap with both feet mostly in the air",
            "bound forward with little ground contact",
            "jump along barely touching the ground",
        ]
    if (la, lb) == ("mid", "mid"):
        return [
            "walk with an even gait",
            "alternate both feet evenly",
            "stride using both legs equally",
        ]
    leaning = a if (la == "down" or lb == "up") else b
    other = b if leaning == a else a
    return [
        f"walk leaning on the {leaning} leg",
        f"limp, favouring the {leaning} foot",
        f"step mostly on the {leaning} foot, lifting the {other} one",
    ]


def _any_feet(contact, names) -> list[str]:
    words = [_word(n) for n in names]
    down = [w for w, x in zip(words, contact, strict=True) if x > HIGH]
    up = [w for w, x in zip(words, contact, strict=True) if x < LOW]
    if len(names) == 1:
        level = _level(contact[0])
        return {
            "down": [
                "hop keeping the foot down",
                "shuffle along on one foot",
                "move with the foot mostly on the ground",
            ],
            "up": [
                "bounce with the foot mostly in the air",
                "spring along in long hops",
                "hop with little ground contact",
            ],
            "mid": ["hop steadily", "hop with an even rhythm", "bounce along evenly"],
        }[level]
    with_down = f"with {' and '.join(down)} mostly on the ground" if down else ""
    with_up = f"with {' and '.join(up)} mostly raised" if up else ""
    detail = ", ".join(p for p in (with_down, with_up) if p) or "with every leg in use"
    return [f"walk {detail}", f"move {detail}", f"travel {detail}"]


def describe(contact, names, speed: str, fell: bool) -> list[str]:
    """``PHRASINGS`` sentences for one elite.

    Args:
        contact: ``[D]`` fraction of time each foot touches the ground.
        names: the D descriptor names.
        speed: "slowly", "" or "quickly".
        fell: whether the episode ended early.
    """
    gaits = _two_feet(contact, names) if len(names) == 2 else _any_feet(contact, names)
    texts = []
    for i, gait in enumerate(gaits[:PHRASINGS]):
        text = f"{gait} {speed}".strip() if i == 0 else gait
        if fell:
            text = f"{text}, then fall over" if i != 2 else "fall over early"
        elif i != 1:
            text = f"{text} without falling"
        texts.append(text)
    return texts


def make_labels(descriptors, returns, episode_fraction, names) -> list[list[str]]:
    """Labels for N elites.

    Args:
        descriptors: ``[N, D]`` foot contact; returns: ``[N]``;
        episode_fraction: ``[N]`` steps before the episode ended / maximum.
        names: the D descriptor names.
    """
    returns = np.asarray(returns, np.float64)
    low, high = np.quantile(returns, [1 / 3, 2 / 3]) if len(returns) else (0, 0)
    speeds = np.where(returns < low, "slowly", np.where(returns > high, "quickly", ""))
    return [
        describe(d, names, str(s), bool(f < FELL))
        for d, s, f in zip(
            np.asarray(descriptors), speeds, np.asarray(episode_fraction), strict=True
        )
    ]


# Region levels as contact intervals, and a contact value inside each.
REGIONS = {"down": (HIGH, 1.0), "up": (0.0, LOW), "mid": (LOW, HIGH)}
_TYPICAL = {"down": 0.85, "up": 0.15, "mid": 0.5}
# Paraphrases the labels never use, per level pattern.
PARAPHRASES = {
    "down": "keep every foot planted on the ground as you move",
    "up": "spend most of the time in the air",
    "mid": "take regular, balanced steps",
    "one": "balance on the {down} leg and bounce forward",
}


def metric_prompts(names) -> list[dict]:
    """The text metric's fixed prompts for a body with feet ``names``.

    For every foot down, every foot up and every foot mid (and, with two
    feet, each foot down with the other up): the gait phrase the labels use
    and a paraphrase that no label contains. Each prompt comes with the
    descriptor region it describes, ``low`` and ``high`` ``[D]``.
    """
    dims = len(names)
    patterns = [(level,) * dims for level in ("down", "up", "mid")]
    if dims == 2:
        patterns += [("down", "up"), ("up", "down")]
    prompts = []
    for pattern in patterns:
        contact = [_TYPICAL[level] for level in pattern]
        gaits = _two_feet(contact, names) if dims == 2 else _any_feet(contact, names)
        if len(set(pattern)) == 1:
            paraphrase = PARAPHRASES[pattern[0]]
        else:
            down = _word(names[pattern.index("down")])
            paraphrase = PARAPHRASES["one"].format(down=down)
        region = {
            "low": [REGIONS[level][0] for level in pattern],
            "high": [REGIONS[level][1] for level in pattern],
        }
        prompts.append({"prompt": gaits[0], "paraphrase": False, **region})
        prompts.append({"prompt": paraphrase, "paraphrase": True, **region})
    return prompts


def in_region(descriptors, low, high) -> np.ndarray:
    """``[N]`` whether each descriptor ``[N, D]`` lies in ``[low, high]``."""
    d = np.asarray(descriptors)
    return np.all((d >= np.asarray(low)) & (d <= np.asarray(high)), axis=-1)


def write_labels(path, cells, texts: list[list[str]]) -> None:
    """Writes the label file (format in the module docstring)."""
    entries = [
        {"cell": int(c), "texts": list(t)} for c, t in zip(cells, texts, strict=True)
    ]
    write_text(path, json.dumps({"labels": entries}, indent=1))


FORMAT = '{"labels": [{"cell": int, "texts": [str, ...]}, ...]}'


def read_labels(path, cells) -> list[list[str]]:
    """Texts per elite, in the order of ``cells`` ``[N]``; one-line errors for a
    file that is not in the format, names a cell twice or a cell that holds
    no elite, or leaves an elite without text."""
    try:
        entries = json.loads(Path(path).read_text())["labels"]
        pairs = [(int(e["cell"]), [str(t) for t in e["texts"]]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LpdError(
            f"cannot read labels from {path} ({e}); expected {FORMAT}"
        ) from None
    by_cell = dict(pairs)
    if len(by_cell) != len(pairs):
        seen = [c for c, _ in pairs]
        twice = sorted({c for c in seen if seen.count(c) > 1})
        raise LpdError(f"{path} names cells {twice[:5]} more than once")
    known = {int(c) for c in cells}
    unknown = sorted(set(by_cell) - known)
    if unknown:
        raise LpdError(
            f"{path} labels cells that hold no elite ({unknown[:5]}); use the cells "
            "of the archive (lpd export-archive, or labels.json of a text stage)"
        )
    missing = [
        int(c) for c in cells if not any(t.strip() for t in by_cell.get(int(c), []))
    ]
    if missing:
        raise LpdError(
            f"{path} has no text for {len(missing)} elites (cells {missing[:5]}...)"
        )
    return [[t for t in by_cell[int(c)] if t.strip()] for c in cells]
