"""The ``lpd`` command: one subcommand per pipeline stage, and the tools.

    lpd <stage> --config <file>[:<arg>] --workdir <dir> [--config.x.y=v ...]

Errors in the user's input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from lpd.errors import LpdError

STAGES = {  # Stage subcommands, which take a config and overrides.
    "archive": "run quality-diversity search and write <workdir>/archive",
    "train-codec": "train the weight codec on <workdir>/archive, write <workdir>/codec",
    "train-diffusion": "train the latent denoiser on <workdir>/codec, write "
    "<workdir>/diffusion",
    "train-text": "label the elites and train a text-conditioned denoiser, write "
    "<workdir>/text",
    "evaluate": "measure the generator against the archive, write <workdir>/report",
    "run": "all stages in turn: archive, train-codec, train-diffusion, train-text, "
    "evaluate",
}
USAGE = "lpd <command> [options]; `lpd <command> -h` for help"


def set_host_devices() -> None:
    """One XLA host device per core, so CPU work shards like on many GPUs.

    Must run before jax is imported; a user's own XLA_FLAGS setting wins.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        if hasattr(os, "sched_getaffinity"):
            count = len(os.sched_getaffinity(0))
        else:
            count = os.cpu_count() or 1
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={count}".strip()
        )


def _add_tools(commands) -> None:
    """The subcommands that work on a trained workdir."""
    export = commands.add_parser(
        "export-archive", help="write the archive of a workdir as a documented .npz"
    )
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="path of the .npz to write")
    imp = commands.add_parser(
        "import-archive", help="make <workdir>/archive from an archive .npz"
    )
    imp.add_argument("--npz", required=True, help="archive .npz (README schema)")
    imp.add_argument("--workdir", required=True)
    sample = commands.add_parser(
        "sample", help="generate policies for descriptors and write them to an .npz"
    )
    sample.add_argument("--workdir", required=True)
    sample.add_argument("--descriptor", help="one descriptor, e.g. 0.2,0.8")
    sample.add_argument(
        "--descriptors-file", help=".npy or comma-separated text, one row each"
    )
    sample.add_argument(
        "--text", help="a sentence instead, e.g. 'hop on the left foot'"
    )
    sample.add_argument("--num", type=int, default=1, help="policies per descriptor")
    sample.add_argument(
        "--return",
        dest="return_quantile",
        help="also ask for a return: 'top' (the best known near each descriptor) "
        "or a quantile in [0, 1]",
    )
    sample.add_argument(
        "--guidance", type=float, help="guidance scale (default: the sweep's pick)"
    )
    sample.add_argument(
        "--steps", type=int, help="DDIM steps (default: config.diffusion.sample_steps)"
    )
    sample.add_argument("--eta", type=float, help="default: config.diffusion.eta")
    sample.add_argument("--sampler", default="ddim", help="ddim or ddpm")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, help="path of the .npz to write")
    render = commands.add_parser(
        "render",
        help="write one episode of a policy: a Brax HTML viewer, or a filmstrip "
        "PNG or GIF that needs no network",
    )
    render.add_argument("--workdir", required=True)
    render.add_argument("--descriptor", help="generate a policy for this descriptor")
    render.add_argument("--elite", type=int, help="index of an archive elite instead")
    render.add_argument("--guidance", type=float, help="default: the sweep's pick")
    render.add_argument("--seed", type=int, default=0, help="sampling and reset seed")
    render.add_argument(
        "--out", required=True, help="path of the .html, .png or .gif to write"
    )
    seq = commands.add_parser(
        "sequence",
        help="chain generated policies in one episode, one per descriptor or text",
    )
    seq.add_argument("--workdir", required=True)
    seq.add_argument("--descriptors", help="asks in order, e.g. 0.1,0.9;0.9,0.1")
    seq.add_argument(
        "--texts", help="or sentences in order, e.g. 'hop on the left foot|walk'"
    )
    seq.add_argument("--seeds", type=int, default=32, help="episodes (vmapped)")
    seq.add_argument("--guidance", type=float, help="default: the sweep's pick")
    seq.add_argument("--seed", type=int, default=0)
    seq.add_argument(
        "--candidates", type=int, default=1, help="policies per chunk (look-ahead)"
    )
    seq.add_argument(
        "--return",
        dest="return_quantile",
        help="also ask the generated policies for a return: 'top' or a quantile",
    )
    seq.add_argument("--replan", type=int, default=25, help="steps between picks")
    seq.add_argument("--horizon", type=int, default=100, help="look-ahead steps")
    seq.add_argument("--out", required=True, help="directory to write (must not exist)")


def _add_host_flags(stage) -> None:
    """Flags of a run over several hosts (one process per host)."""
    hosts = stage.add_argument_group(
        "several hosts",
        "one lpd process per host, all with the same command and a shared --workdir",
    )
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="join the run over several hosts that jax detects (TPU pod, SLURM, "
        "Open MPI)",
    )
    hosts.add_argument(
        "--coordinator", help="or name it: host:port of process 0 (LPD_COORDINATOR)"
    )
    hosts.add_argument(
        "--num-processes", help="how many processes in all (LPD_NUM_PROCESSES)"
    )
    hosts.add_argument("--process-id", help="this one's, from 0 (LPD_PROCESS_ID)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpd",
        usage=USAGE,
        description="lpd: latent policy diffusion, one subcommand per stage.",
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_text in STAGES.items():
        stage = commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text}; resumes when interrupted, skips when "
            "complete; --config.a.b=v overrides a config field.",
        )
        stage.add_argument("--config", required=True, help="config file, path.py[:arg]")
        stage.add_argument("--workdir", required=True, help="directory of the run")
        _add_host_flags(stage)
    _add_tools(commands)
    return parser


def _stages(args, overrides: list[str]) -> None:
    """``lpd <stage>`` and ``lpd run``: checks the config, locks the workdir."""
    from lpd import pipeline, workdir
    from lpd.config import load_config

    workdir.check_workdir(args.workdir)
    config = load_config(args.config, overrides)
    names = list(pipeline.STAGES) if args.command == "run" else [args.command]
    pipeline.validate(config, names)
    pipeline.check_disk(config, args.workdir, names)
    from lpd import devices

    with workdir.lock(args.workdir):
        for name in names:
            devices.sync(f"start {name}")
            directory = pipeline.STAGES[name](config, args.workdir)
            devices.sync(f"end {name}")
            if devices.is_main():
                print(f"{name}: written to {directory}")


def _sample(args) -> None:
    from lpd import archive_io, generator, text_stage
    from lpd.config import check_seed

    check_seed(args.seed)
    meta = archive_io.load_meta(args.workdir)
    texts = None
    if args.text is not None:
        if args.descriptor is not None or args.descriptors_file is not None:
            raise LpdError("give --text or a descriptor, not both")
        texts = [args.text.strip()]
        conditions = text_stage.encode_prompts(texts, "--text")
    else:
        conditions = generator.parse_descriptors(
            args.descriptor, args.descriptors_file, meta
        )
    options = {
        "guidance": args.guidance,
        "steps": args.steps,
        "eta": args.eta,
        "sampler": args.sampler,
        "seed": args.seed,
        "return": generator.parse_return(args.return_quantile),
    }
    out, num = generator.sample_to_npz(
        args.workdir, conditions, args.num, options, args.out, texts
    )
    print(f"sample: wrote {num} policies to {out}")


def _render(args) -> None:
    from lpd import render
    from lpd.config import check_seed
    from lpd.workdir import check_out

    check_seed(args.seed)
    check_out(args.out, render.SUFFIXES)
    flat, what = _policy_to_render(args)
    result = render.render_episode(args.workdir, flat, args.seed, args.out)
    print(
        f"render: {what}: {result['steps']} steps, return {result['return']:.1f}, "
        f"foot contact {result['descriptor']} -> {args.out}"
    )


def _policy_to_render(args) -> tuple[dict, str]:
    """The policy ``lpd render`` asks for: a generated one or an archive elite."""
    import jax
    import jax.numpy as jnp

    from lpd import archive_io, generator

    if (args.descriptor is None) == (args.elite is None):
        raise LpdError("give exactly one of --descriptor and --elite")
    if args.elite is not None:
        archive, _ = archive_io.load_archive(args.workdir)
        idx, flat = archive_io.elites(archive)
        if not 0 <= args.elite < len(idx):
            raise LpdError(f"--elite must lie in [0, {len(idx) - 1}]")
        asked = [round(float(v), 3) for v in archive.descriptors[idx[args.elite]]]
        return {
            p: x[args.elite] for p, x in flat.items()
        }, f"elite {args.elite} {asked}"
    meta = archive_io.load_meta(args.workdir)
    cond = generator.parse_descriptors(args.descriptor, None, meta)
    guidance = generator.picked_guidance(args.workdir, args.guidance)
    gen = generator.load_generator(args.workdir)
    sample_fn = generator.make_sample_fn(gen)
    flat = sample_fn(jnp.asarray(cond), jax.random.key(args.seed), guidance)
    return {p: x[0] for p, x in flat.items()}, f"generated for {args.descriptor}"


def _sequence(args) -> None:
    from lpd import archive_io, generator, sequence
    from lpd.config import check_seed

    check_seed(args.seed)
    if (args.descriptors is None) == (args.texts is None):
        raise LpdError("give exactly one of --descriptors and --texts")
    asked, texts = None, None
    if args.texts is not None:
        texts = sequence.parse_texts(args.texts)
    else:
        meta = archive_io.load_meta(args.workdir)
        asked = sequence.parse_sequence(args.descriptors, meta)
    options = {
        k: getattr(args, k)
        for k in ("seeds", "guidance", "seed", "candidates", "replan", "horizon")
    }
    options["return"] = generator.parse_return(args.return_quantile)
    summary = sequence.run_sequence(args.workdir, asked, options, args.out, texts)
    print(sequence.format_summary(summary))
    print(f"sequence: written to {args.out}")


def _export(args) -> None:
    from lpd import archive_io

    out = archive_io.export_npz(args.workdir, args.out)
    print(f"export-archive: wrote {out}")


def _import(args) -> None:
    from lpd import archive, workdir
    from lpd.workdir import archive_dir

    workdir.check_workdir(args.workdir)
    with workdir.lock(args.workdir):
        meta = archive.import_archive(args.npz, args.workdir)
    print(
        f"import-archive: {meta['num_elites']} elites written to "
        f"{archive_dir(args.workdir)}"
    )


TOOLS = {
    "sample": _sample,
    "render": _render,
    "sequence": _sequence,
    "export-archive": _export,
    "import-archive": _import,
}


def _start(args) -> None:
    """Joins a run over several hosts when asked, starts jax, and logs the
    platform and devices on stdout (stderr keeps an error to one line); on
    stderr, the extra to install when an accelerator goes unused. Processes
    other than the first print nothing but errors."""
    from lpd import devices

    if args.command in STAGES:
        devices.start_hosts(
            args.coordinator, args.num_processes, args.process_id, args.distributed
        )
    problems = devices.start_backends()
    if not devices.is_main():
        logging.getLogger("lpd").setLevel(logging.WARNING)
        return
    print(devices.platform_line())
    warning = devices.platform_warning(problems)
    if warning:
        print(warning, file=sys.stderr)


def run(argv: list[str]) -> int:
    """Runs the command line ``argv``; raises ``LpdError`` on bad input."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        raise LpdError(
            f"unrecognised arguments: {' '.join(unknown)} (see lpd {args.command} -h)"
        )
    _start(args)
    if args.command in STAGES:
        _stages(args, overrides)
    elif overrides:
        raise LpdError(f"lpd {args.command} takes no --config overrides")
    else:
        TOOLS[args.command](args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``lpd`` in this process (tests, notebooks); returns the exit status."""
    set_host_devices()
    logger = logging.getLogger("lpd")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # absl/orbax may configure the root logger too.
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except LpdError as e:
        print(f"lpd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # A folder that is read-only, full, or a file.
        where = f": {e.filename}" if e.filename else ""
        print(f"lpd: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lpd: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def console() -> None:
    """The ``lpd`` script: :func:`main`, with ``kill`` (SIGTERM) stopping like
    Ctrl-C (temporary files removed, resumable), and after an error an
    immediate exit, so no thread still running prints past its one line."""
    signal.signal(signal.SIGTERM, _interrupt)
    code = main()
    if code:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
