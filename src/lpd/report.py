"""The evaluation report: metrics from scored policy sets, JSON, markdown, plots.

Pure functions of the evaluation's results (no rollouts here), so the
metrics can be checked on hand-made inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from lpd import evaluation, labels, plots
from lpd import policy as policy_lib
from lpd.config import diff_configs
from lpd.errors import LpdError
from lpd.workdir import STAGE_DIRS, stage_dir, write_json, write_text


class Results(NamedTuple):
    """Scored policy sets of one evaluation (N elites, U uniform conditions).

    Attributes:
        asked: ``[N, D]`` the elites' stored descriptors (the conditions).
        original: ``(returns [N], achieved [N, D])`` of the re-evaluated elites.
        codec_only: the same for each elite decoded from its latent.
        generated: ``(returns [N], achieved [N, D], weight distance to the
            nearest elite [N], its index [N])`` for one sample per elite.
        uniform_asked: ``[U, D]`` descriptors drawn uniformly.
        uniform: like ``generated``, for ``uniform_asked``.
        elite_distances: ``[N]`` each elite's distance to its nearest other
            elite in weight space (the scale novelty is read against).
        top_return: like ``generated``, asked for each elite's descriptor at
            the top return quantile; None for a descriptor-only denoiser.
        baselines: name -> ``{"archive": (returns, achieved), "uniform":
            (returns, achieved), **settings}`` for the copy-and-perturb
            baselines, on the archive asks and the uniform asks.
        dcrl_actor: ``{"archive": (returns, achieved), "uniform": (...)}``
            for a DCRL-ME archive's actor conditioned on both ask sets;
            None for other archives.
    """

    asked: np.ndarray
    original: tuple
    codec_only: tuple
    generated: tuple
    uniform_asked: np.ndarray
    uniform: tuple
    elite_distances: np.ndarray
    top_return: tuple | None = None
    baselines: dict | None = None
    dcrl_actor: dict | None = None


def model_sizes(gen, flat: dict) -> dict:
    """Parameter counts and bytes (at the stored dtype) of archive and generator.

    The generator is what sampling needs: the codec's decoder, its weight
    standardiser and the denoiser (whose conditioning is trained with it).
    """
    num = next(iter(flat.values())).shape[0]
    per_policy = int(sum(np.prod(x.shape[1:]) for x in flat.values()))
    trees = {
        "decoder": gen.codec_params["params"]["decoder"],
        "standardiser": gen.stats,
        "denoiser": gen.denoiser_params,
    }
    params = {k: policy_lib.count_params(t) for k, t in trees.items()}
    nbytes = {
        k: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(t))
        for k, t in trees.items()
    }
    return {
        "num_elites": int(num),
        "params_per_policy": per_policy,
        "archive_params": per_policy * int(num),
        "archive_bytes": int(sum(np.asarray(x).nbytes for x in flat.values())),
        "model_params": {**params, "total": sum(params.values())},
        "model_bytes": {**nbytes, "total": sum(nbytes.values())},
    }


def _novelty(generated, elite_descriptors, elite_distances) -> dict:
    """Distances from generated policies to their nearest training elites."""
    _, achieved, weight_distance, _ = generated
    dist, _ = evaluation.nearest(
        np.asarray(achieved, np.float32), np.asarray(elite_descriptors, np.float32)
    )
    return {
        "weight_distance": evaluation.quantiles(weight_distance),
        "elite_to_elite_weight_distance": evaluation.quantiles(elite_distances),
        "weight_distance_over_elite_spacing": float(
            np.median(weight_distance) / np.median(elite_distances)
        ),
        "descriptor_distance": evaluation.quantiles(np.asarray(dist)[:, 0]),
    }


def _nearest_elite(results: Results) -> tuple:
    """Nearest-elite lookup (1x): each uniform ask answered by the elite whose
    stored descriptor is closest, scored by its re-evaluation."""
    _, pick = evaluation.nearest(
        np.asarray(results.uniform_asked), np.asarray(results.asked, np.float32)
    )
    pick = np.asarray(pick)[:, 0]
    return tuple(np.asarray(x)[pick] for x in results.original[:2])


def summarise(results: Results, centroids, meta: dict, sizes: dict) -> dict:
    """The report's metrics: top level for the generator on the elites' cells,
    ``uniform``, ``codec_only`` and ``original`` beside it, and ``novelty``."""
    offset = meta["fitness_offset"]
    orig = results.original
    fid = lambda scored, asked: evaluation.fidelity(
        orig, scored[:2], asked, centroids, offset
    )
    # A set asked for the elites' descriptors: its fidelity and its shortfall.
    on_elites = lambda scored: {
        **fid(scored, results.asked),
        "shortfall": evaluation.shortfall(orig[0], scored[0]),
    }
    params, nbytes = sizes["model_params"], sizes["model_bytes"]
    codec_params = params["decoder"] + params["standardiser"]
    codec_bytes = nbytes["decoder"] + nbytes["standardiser"]
    summary = {
        "env": meta["env"],
        "backend": meta["backend"],
        "episode_length": meta["episode_length"],
        "descriptor_names": meta["descriptor_names"],
        "fitness_offset": offset,
        **sizes,
        **on_elites(results.generated),
        "compression_ratio": sizes["archive_params"] / params["total"],
        "compression_ratio_bytes": sizes["archive_bytes"] / nbytes["total"],
        "original": {
            "mean_return": float(np.mean(orig[0])),
            "filled_cells": evaluation.archive_summary(*orig, centroids, offset)[
                "filled_cells"
            ],
            "stored_filled_cells": sizes["num_elites"],
            "measure_error": float(
                np.mean(np.linalg.norm(np.asarray(orig[1]) - results.asked, axis=-1))
            ),
        },
        "codec_only": {
            **on_elites(results.codec_only),
            "compression_ratio": sizes["archive_params"] / codec_params,
            "compression_ratio_bytes": sizes["archive_bytes"] / codec_bytes,
        },
        "uniform": {
            **fid(results.uniform, results.uniform_asked),
            "num_conditions": int(len(results.uniform_asked)),
            "nearest_elite": fid(_nearest_elite(results), results.uniform_asked),
            "novelty": _novelty(
                results.uniform, results.asked, results.elite_distances
            ),
        },
        "novelty": {
            **_novelty(results.generated, results.asked, results.elite_distances),
            # Generated policy i was asked for elite i's descriptor.
            "nearest_elite_is_asked_fraction": float(
                np.mean(results.generated[3] == np.arange(len(results.generated[3])))
            ),
        },
    }
    if results.top_return is not None:
        summary["top_return"] = on_elites(results.top_return)
    summary["baselines"] = {
        name: {
            **fid(b["archive"], results.asked),
            "uniform": fid(b["uniform"], results.uniform_asked),
            **{k: v for k, v in b.items() if k not in ("archive", "uniform")},
        }
        for name, b in (results.baselines or {}).items()
    }
    if results.dcrl_actor is not None:
        summary["dcrl_actor"] = {
            **fid(results.dcrl_actor["archive"], results.asked),
            "uniform": fid(results.dcrl_actor["uniform"], results.uniform_asked),
            "compression_ratio": sizes["archive_params"] / meta["actor"]["params"],
        }
    return summary


def stage_times(workdir, evaluate_s: float) -> dict:
    """Wall time of each stage, from its ``meta.json`` (None when not recorded)."""
    times = {}
    for stage in STAGE_DIRS[:-1]:  # The trained stages; the report is this one.
        path = stage_dir(workdir, stage) / "meta.json"
        meta = json.loads(path.read_text()) if path.exists() else {}
        times[stage] = meta.get("wall_time_s")
    times["evaluate"] = round(evaluate_s, 1)
    return times


def text_summary(prompts: list[dict], samples: int, by_text, by_descriptor, original):
    """The text metric: per prompt, how many generated policies land in its region.

    Args:
        prompts: :func:`lpd.labels.metric_prompts`' entries.
        samples: generated policies per prompt.
        by_text: ``(returns, achieved, ...)`` of the policies generated from
            each prompt's embedding, ``samples`` per prompt in prompt order.
        by_descriptor: the same for the descriptor model asked each region's
            centre (what the prompt would get if the region were known).
        original: ``(returns, achieved)`` of the re-evaluated elites (chance:
            the archive's own share of each region).
    """
    rows = []
    for k, p in enumerate(prompts):
        part = slice(k * samples, (k + 1) * samples)
        hit = labels.in_region(by_text[1][part], p["low"], p["high"])
        hit_descriptor = labels.in_region(by_descriptor[1][part], p["low"], p["high"])
        rows.append(
            {
                **p,
                "in_region": float(hit.mean()),
                "mean_return": float(np.mean(by_text[0][part])),
                "descriptor_in_region": float(hit_descriptor.mean()),
                "descriptor_mean_return": float(np.mean(by_descriptor[0][part])),
                "archive_in_region": float(
                    labels.in_region(original[1], p["low"], p["high"]).mean()
                ),
            }
        )
    mean = lambda key, subset=rows: float(np.mean([r[key] for r in subset]))
    phrases = [r for r in rows if not r["paraphrase"]]
    paraphrases = [r for r in rows if r["paraphrase"]]
    return {
        "samples_per_prompt": samples,
        "in_region": mean("in_region"),
        "in_region_label_phrases": mean("in_region", phrases),
        "in_region_paraphrases": mean("in_region", paraphrases),
        "mean_return": mean("mean_return"),
        "descriptor_in_region": mean("descriptor_in_region"),
        "archive_in_region": mean("archive_in_region"),
        "prompts": rows,
    }


def _text_lines(t: dict) -> list[str]:
    lines = [
        "",
        f"Text metric ({t['samples_per_prompt']} generated policies per prompt): "
        f"share whose achieved foot contact lies in the region the prompt "
        f"describes, for the text model, for the descriptor model asked the "
        f"region's centre, and for the archive's own elites (chance).",
        "",
        "| prompt | paraphrase | text model | return | descriptor model | archive |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['prompt']} | {'yes' if r['paraphrase'] else 'no'} | "
        f"{r['in_region']:.2f} | {r['mean_return']:.0f} | "
        f"{r['descriptor_in_region']:.2f} | {r['archive_in_region']:.2f} |"
        for r in t["prompts"]
    ]
    lines += [
        f"| **mean** | | {t['in_region']:.2f} | {t['mean_return']:.0f} | "
        f"{t['descriptor_in_region']:.2f} | {t['archive_in_region']:.2f} |",
    ]
    return lines


def _row(label: str, m: dict, compression) -> str:
    r = evaluation.format_ratio
    js = "n/a" if m["js_divergence"] is None else f"{m['js_divergence']:.4f}"
    error = "n/a" if m["measure_error"] is None else f"{m['measure_error']:.3f}"
    return (
        f"| {label} | {r(m['reward_ratio'])} | {r(m['offset_reward_ratio'])} | "
        f"{r(m['coverage_ratio'])} | {r(m['qd_score_ratio'])} | {js} | {error} | "
        f"{compression:.1f}x |"
    )


def _baseline_name(name: str, b: dict) -> str:
    if name == "elite_noise":
        return "elite + noise"
    return f"mean of {b['k']} nearest elites"


def _shortfall_lines(s: dict) -> list[str]:
    """Where the generated and the codec's policies lose their reward."""
    lines = []
    for name, f in (
        ("Generated", s.get("shortfall")),
        ("Codec", s["codec_only"].get("shortfall")),
        ("Top-return", s.get("top_return", {}).get("shortfall")),
    ):
        if not f or not f["share"]:
            continue
        lines.append(
            f"{name} policies keeping less than {f['fraction']:g} of their elite's "
            f"return: {100 * f['share']:.1f}% of the asks, which lose "
            f"{100 * f['reward_lost']:.1f}% of the elites' total return; on the "
            "other asks the reward ratio is "
            + evaluation.format_ratio(f["reward_ratio_without"])
            + "."
        )
    return ["", *lines] if lines else []


def to_markdown(s: dict) -> str:
    """``report.md``: the table of the report and what it was measured on."""
    lines = [
        f"# Evaluation: {s['env']} ({s['backend']}), {s['num_elites']} elites",
        "",
        f"Each policy: {s['episodes']} random-reset episodes of "
        f"{s['episode_length']} steps, the same episodes for every set; "
        f"ratios against the re-evaluated original archive (mean return "
        f"{s['original']['mean_return']:.1f}, {s['original']['filled_cells']} "
        f"cells). Guidance {s['guidance']:g}, {s['sample_steps']} DDIM steps. "
        f"Reward ratio: mean return over the originals' (the paper's; n/a when "
        f"theirs is not positive); offset reward ratio: the same on returns plus "
        f"the task's fitness offset ({s['fitness_offset']:g}, as in the QD score).",
        "",
        "| policies | reward ratio | offset reward ratio | coverage ratio | "
        "QD-score ratio | JS divergence | measure error | compression |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("generated (diffusion)", s, s["compression_ratio"])]
    if "top_return" in s:
        rows.append(
            ("generated, top return asked", s["top_return"], s["compression_ratio"])
        )
    rows.append(("codec only", s["codec_only"], s["codec_only"]["compression_ratio"]))
    actor = s.get("dcrl_actor")
    if actor:
        rows.append(("DCRL-ME actor", actor, actor["compression_ratio"]))
    rows += [
        (f"baseline: {_baseline_name(n, b)}", b, 1.0) for n, b in s["baselines"].items()
    ]
    rows += [
        ("uniform sweep: generated", s["uniform"], s["compression_ratio"]),
        ("uniform sweep: nearest elite", s["uniform"]["nearest_elite"], 1.0),
    ]
    rows += [
        (f"uniform sweep: {_baseline_name(n, b)}", b["uniform"], 1.0)
        for n, b in s["baselines"].items()
    ]
    if actor:
        rows.append(
            (
                "uniform sweep: DCRL-ME actor",
                actor["uniform"],
                actor["compression_ratio"],
            )
        )
    lines += [_row(*row) for row in rows]
    n, p = s["novelty"], s["model_params"]
    lines += [
        "",
        f"Measure error of the re-evaluated originals against their stored "
        f"descriptors (the noise floor): {s['original']['measure_error']:.3f}.",
        *_shortfall_lines(s),
        "",
        f"Compression: {s['archive_params']:,} archive parameters "
        f"({s['num_elites']} x {s['params_per_policy']:,}) / {p['total']:,} "
        f"generator parameters (decoder {p['decoder']:,}, standardiser "
        f"{p['standardiser']:,}, denoiser {p['denoiser']:,}).",
        "",
        f"Novelty: generated policies lie a median "
        f"{n['weight_distance']['q50']:.2f} from their nearest elite in weight "
        f"space, where elites lie {n['elite_to_elite_weight_distance']['q50']:.2f}"
        f" from each other (ratio {n['weight_distance_over_elite_spacing']:.2f}); "
        f"{100 * n['nearest_elite_is_asked_fraction']:.1f}% have the asked elite "
        f"as nearest. Median descriptor distance to the nearest elite: "
        f"{n['descriptor_distance']['q50']:.3f}.",
        *_text_lines(s["text"]),
        "",
        "![heatmaps](heatmaps.png)",
        "",
        "![descriptors](descriptors.png)",
        "",
        "![returns](returns.png)",
        "",
        "Wall time (s): "
        + ", ".join(f"{k} {v}" for k, v in s["wall_time_s"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def write(directory, summary: dict, results: Results, centroids, meta: dict) -> None:
    """Writes ``report.json``, ``report.md`` and the PNGs into ``directory``."""
    directory = Path(directory)
    offset = meta["fitness_offset"]
    cells = lambda scored: evaluation.archive_summary(*scored[:2], centroids, offset)[
        "cell_fitnesses"
    ]
    heatmaps = {
        "original (re-evaluated)": cells(results.original),
        "codec only": cells(results.codec_only),
        "generated": cells(results.generated),
    }
    matches = {
        "generated, archive asks": (results.asked, results.generated[1]),
        "generated, uniform asks": (results.uniform_asked, results.uniform[1]),
    }
    returns = {
        "original": results.original[0],
        "codec only": results.codec_only[0],
        "generated": results.generated[0],
        "generated, uniform asks": results.uniform[0],
    }
    if results.dcrl_actor is not None:
        actor = results.dcrl_actor["archive"]
        heatmaps["DCRL-ME actor"] = cells(actor)
        matches["DCRL-ME actor, archive asks"] = (results.asked, actor[1])
        returns["DCRL-ME actor"] = actor[0]
    plots.plot_heatmaps(heatmaps, centroids, meta, directory / "heatmaps.png")
    plots.plot_descriptor_match(
        matches, meta["descriptor_names"], directory / "descriptors.png"
    )
    plots.plot_return_cdfs(returns, directory / "returns.png")
    write_text(directory / "report.md", to_markdown(summary))
    write_json(directory / "report.json", summary)


PEER_KEYS = (
    "reward_ratio",
    "offset_reward_ratio",
    "coverage_ratio",
    "qd_score_ratio",
    "js_divergence",
    "measure_error",
)


def peers(workdir, reference=None) -> dict:
    """lpd beside DCRL-ME's actor, from a DCRL-ME workdir's report
    (``benchmarks/bench_peers.py``): one entry per method with the
    fidelity keys on the archive asks, a ``uniform`` sub-dict (None where a
    method has no uniform row), ``compression`` and ``extra_training_s``.

    lpd's extra training is its codec and diffusion stages; the actor's is
    the archive stage's wall time over that of ``reference``, a workdir
    whose archive was searched with the same settings but the emitter (None
    without one).
    """
    path = stage_dir(workdir, "report") / "report.json"
    if not path.exists():
        raise LpdError(f"no report in {path.parent}: run `lpd evaluate` first")
    s = json.loads(path.read_text())
    if "dcrl_actor" not in s:
        raise LpdError(
            f"the report of {workdir} has no DCRL-ME actor: search its archive "
            "with archive.emitter=dcrl_me (experiments/configs/dcrl.py)"
        )
    times = s["wall_time_s"]
    lpd_s = times["codec"] + times["diffusion"]
    actor_s = None
    if reference is not None:
        actor_s = times["archive"] - _reference_search_s(workdir, reference)

    def entry(m, uniform, compression, extra_s):
        pick = lambda d: None if d is None else {k: d[k] for k in PEER_KEYS}
        return {
            **pick(m),
            "uniform": pick(uniform),
            "compression": compression,
            "extra_training_s": extra_s,
        }

    itself = {k: 1.0 for k in PEER_KEYS}
    itself.update(js_divergence=0.0, measure_error=s["original"]["measure_error"])
    lookup = s["uniform"]["nearest_elite"]
    base = s["baselines"]
    methods = {
        "archive": entry(itself, None, 1.0, 0.0),
        "lpd_generated": entry(s, s["uniform"], s["compression_ratio"], lpd_s),
        "lpd_codec_only": entry(
            s["codec_only"], None, s["codec_only"]["compression_ratio"], times["codec"]
        ),
        "lpd_top_return": (
            entry(s["top_return"], None, s["compression_ratio"], lpd_s)
            if "top_return" in s
            else None
        ),
        "dcrl_actor": entry(
            s["dcrl_actor"],
            s["dcrl_actor"]["uniform"],
            s["dcrl_actor"]["compression_ratio"],
            actor_s,
        ),
        "nearest_elite": entry(itself, lookup, 1.0, 0.0),
        **{name: entry(b, b["uniform"], 1.0, 0.0) for name, b in base.items()},
    }
    return {
        "env": s["env"],
        "num_elites": s["num_elites"],
        "episodes": s["episodes"],
        "methods": {k: v for k, v in methods.items() if v is not None},
        "stage_wall_time_s": times,
    }


def _reference_search_s(workdir, reference) -> float:
    """The archive stage wall time of ``reference``, refused unless its
    archive settings match those of ``workdir`` but the emitter's."""
    paths = [stage_dir(w, "archive") / "meta.json" for w in (workdir, reference)]
    if not paths[1].exists():
        raise LpdError(f"--reference {reference} holds no complete archive")
    metas = [json.loads(p.read_text()) for p in paths]
    if not all(m.get("config") and m.get("wall_time_s") for m in metas):
        raise LpdError(
            f"--reference {reference}: both archives must come from `lpd archive` "
            "(an imported one has no search settings or wall time)"
        )
    diffs = [
        d
        for d in diff_configs(metas[1]["config"], metas[0]["config"])
        if d.startswith("config.archive.")
        and not d.startswith(("config.archive.emitter", "config.archive.dcrl"))
    ]
    if diffs or metas[0]["config"]["seed"] != metas[1]["config"]["seed"]:
        raise LpdError(
            f"--reference {reference} searched its archive with other settings "
            f"than {workdir} ({', '.join(diffs) or 'seed'}); give one that differs "
            "in the emitter only"
        )
    return metas[1]["wall_time_s"]
