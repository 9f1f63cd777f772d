"""``gppq mlflow sync`` and ``gppq compare`` (registered on the main app in gppq_dist.cli).

MLflow is imported only when one of these commands runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from gppq_dist.console import stdout
from gppq_dist.errors import UserError

mlflow_app = typer.Typer(
    no_args_is_help=True,
    help="MLflow tracking: upload what a run's journal holds and the tracking store missed.",
)

UriOption = typer.Option(None, "--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


@mlflow_app.command("sync")
def sync_command(
    run_dir: Path = typer.Argument(..., help="run folder (holds tracking.jsonl), e.g. runs/<name>"),
    uri: Optional[str] = typer.Option(None, "--uri", help="tracking URI; default: the one the run used"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a line"),
) -> None:
    """Upload what RUN_DIR/tracking.jsonl holds and MLflow does not, e.g. after the server was
    down (a second sync uploads nothing).

    Uses the run in RUN_DIR/mlflow_run_id; creates it where the store does not hold it.
    """
    from gppq_dist.tracking.sync import sync

    pushed, target = sync(run_dir, uri)
    if as_json:
        sys.stdout.write(json.dumps({"uri": target, **pushed.to_dict()}, indent=2) + "\n")
        return
    run = f"{'created ' if pushed.created else ''}run {pushed.run_id} (experiment {pushed.experiment!r} at {target})"
    stdout.print(f"{run_dir}: {run}: {pushed.describe()}", highlight=False, markup=False)
    if pushed.conflicts:
        stdout.print(f"kept MLflow's values of params changed since: {', '.join(pushed.conflicts)}",
                     highlight=False, markup=False)
    if pushed.missing_files:
        stdout.print(f"not found, not uploaded: {', '.join(pushed.missing_files)}", highlight=False, markup=False)


def compare_command(
    experiment: str = typer.Option(..., "--experiment", "-e", metavar="NAME", help="MLflow experiment name"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR",
                                       help="output folder; default: runs/compare/<experiment>"),
    uri: Optional[str] = UriOption,
) -> None:
    """Table of an experiment's finished runs (CSV + Markdown) and a size vs top-1 Pareto plot.

    Method, regime, K of the 3x3 convs, mu, accounted MB, ratio and top-1 with quantization;
    the files are also logged to the experiment's 'compare' run.
    """
    from gppq_dist.tracking.compare import COLUMNS, HEADERS, cell, compare

    if not experiment.strip():
        raise UserError("--experiment: expected an experiment name")
    result = compare(experiment, out, uri)
    count = len(result["rows"])
    table = Table(title=f"{experiment} ({result['uri']}): {count} finished run{'s' * (count != 1)}")
    for column in COLUMNS:
        table.add_column(HEADERS[column], justify="right" if column in
                         ("k_conv3x3", "mu", "size_mb", "ratio", "top1_quantized") else "left")
    for row in result["rows"]:
        table.add_row(*[Text(cell(row[c], c)) for c in COLUMNS])
    stdout.print(table)
    stdout.print(f"wrote {', '.join(result['files'])}; logged to run {result['compare_run_id']}",
                 highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``gppq mlflow ...`` and ``gppq compare`` to the main app."""
    app.add_typer(mlflow_app, name="mlflow")
    app.command("compare")(compare_command)
