"""The commands every rank runs, ``train`` and ``compress``, and the options all commands
share.

``gppq train`` / ``gppq compress`` (:mod:`gppq_dist.cli`) register these functions, and
torchrun's entry points run them alone with the same flags: ``python -m gppq_dist.train``
(:mod:`gppq_dist.train.__main__`) and ``python -m gppq_dist.compress`` call
:func:`torchrun_main`. So the library never imports the command line: the dependency runs
from :mod:`gppq_dist.cli` down to this module and from here down to the library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from gppq_dist.console import print_json, run_app, stdout
from gppq_dist.errors import UserError

ConfigOption = typer.Option(..., "--config", "-c", metavar="CFG", help="run config (YAML)")
ArchOption = typer.Option(None, "--arch", help="override model.arch (any torchvision ResNet/ResNeXt/...)")
SetOption = typer.Option(None, "--set", metavar="KEY=VALUE",
                         help="override a config key: KEY=VALUE (repeatable)")
JsonOption = typer.Option(False, "--json", help="print one JSON object instead of a table")
DeviceOption = typer.Option("auto", "--device", metavar="auto|cpu|cuda",
                            help="auto: one GPU per process when CUDA is visible, else the CPU; cpu; cuda")


def load_run_config(path: Path, arch: str | None = None, sets: list[str] | None = None):
    """The config file with ``--set`` overrides and ``--arch`` applied."""
    from gppq_dist.config import load_config, parse_overrides

    overrides = parse_overrides(sets or [])
    if arch:  # --arch names a torchvision model: it replaces a factory the file may name
        overrides.update({"model.arch": arch, "model.factory": None, "model.kwargs": {}})
    return load_config(path, overrides)


def train(
    config: Path = ConfigOption,
    nproc: int = typer.Option(1, "--nproc", min=1, metavar="N",
                              help="processes on this machine (runs torchrun for N > 1)"),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, metavar="R",
                                     help="with --nproc: torchrun restarts after a failed rank (resuming)"),
    resume: str = typer.Option("none", "--resume", metavar="auto|none",
                               help="auto: continue from the newest checkpoint; none: start fresh"),
    sets: Optional[list[str]] = SetOption,
    device: str = DeviceOption,
) -> None:
    """Compress with the config's method (default G&P PQ: k-means, then the progressive
    update); writes <run dir>/gppq.gppq and summary.json.

    Identical to: torchrun --nproc_per_node=N [--max-restarts=R] -m gppq_dist.train --config CFG
    """
    from gppq_dist.distributed import init_distributed, launch_local, shutdown

    if nproc > 1 and "RANK" not in os.environ:
        args = ["--config", str(config), "--resume", resume, "--device", device]
        for item in sets or []:
            args += ["--set", item]
        raise typer.Exit(launch_local(nproc, "gppq_dist.train", args, max_restarts, device))
    from gppq_dist.methods import result_line, run

    if resume not in ("auto", "none"):
        raise UserError(f"--resume: expected 'auto' or 'none', got {resume!r}")
    cfg = load_run_config(config, None, sets)
    context = init_distributed(device)
    try:
        summary = run(cfg, context, resume=resume == "auto")
    finally:
        shutdown()
    if context.is_main:
        stdout.print(result_line(summary), markup=False, highlight=False)


def compress(
    config: Path = ConfigOption,
    weights: Optional[str] = typer.Option(
        None, "--weights", metavar="PATH|NAME|random", help="state dict file (.safetensors/.pt), a torchvision "
        "weights name of the arch (IMAGENET1K_V1, DEFAULT, ...) or 'random'; default: model.weights"
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE",
                                       help="artifact path; default: <run dir>/direct_pq.gppq"),
    arch: Optional[str] = ArchOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
    device: str = DeviceOption,
) -> None:
    """Direct PQ: k-means on the weights, no finetuning; writes a .gppq artifact. With a method
    that does not train (kmeans_scalar, pq_subspace, residual_pq), that method's codes instead.

    Under torchrun (python -m gppq_dist.compress ...) the k-means is distributed.
    """
    from gppq_dist.compress import compress as run_compress
    from gppq_dist.distributed import init_distributed, shutdown

    cfg = load_run_config(config, arch, sets)
    context = init_distributed(device)
    try:
        summary = run_compress(cfg, out or cfg.run_dir / "direct_pq.gppq", context, weights)
    finally:
        shutdown()
    if not context.is_main:
        return
    if as_json:
        print_json(summary)
        return
    stdout.print(
        f"wrote {summary['artifact']}: {summary['file_bytes']:,} bytes, accounted "
        f"{summary['accounted_mb']:.3f} MB, ratio {summary['ratio']:.1f}x, Gamma {summary['gamma']:.3e}, "
        f"k-means {summary['kmeans_s']:.1f} s on {summary['world_size']} rank(s)"
    )


RANK_COMMANDS = {"train": train, "compress": compress}


def torchrun_main(command: str, argv: list[str] | None = None) -> None:
    """``python -m gppq_dist.<command>``: the one command as a program of its own, with the
    flags of ``gppq <command>`` (what torchrun runs on every rank)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(RANK_COMMANDS[command])
    run_app(app, sys.argv[1:] if argv is None else argv, prog_name=f"python -m gppq_dist.{command}")
