"""``gppq compare``: an experiment's finished runs side by side, and their Pareto front.

One row per finished run that logged ``size_mb`` and ``top1_quantized``: method (tag),
regime (the config's ``name``), K of the 3x3 convs (``quantization.types.conv3x3.k``, else
``quantization.default.k``), mu (``train.mu``), accounted MB, ratio and top-1 with
quantization. Written as ``compare.csv`` (values exactly as MLflow holds them) and
``compare.md`` (rounded for reading), with ``pareto.png`` (size on a log axis against top-1,
one marker per method, the front drawn). The three files are also logged to MLflow as the
artifacts of one run named ``compare`` in the same experiment (tagged ``gppq_role:
compare``, reused by every later compare, and never a row of the table itself).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from gppq_dist.errors import UserError
from gppq_dist.io import write_text_atomic
from gppq_dist.tracking.plots import pareto_front, pareto_png
from gppq_dist.tracking.sync import experiment_id
from gppq_dist.tracking.tracker import client_for, describe_failure, mlflow_calls, resolve_uri

ROLE_TAG = "gppq_role"
COLUMNS = ("run", "method", "regime", "k_conv3x3", "mu", "size_mb", "ratio", "top1_quantized", "pareto", "run_id")
HEADERS = {"run": "run", "method": "method", "regime": "regime", "k_conv3x3": "K (3x3)", "mu": "mu",
           "size_mb": "size MB", "ratio": "ratio", "top1_quantized": "top-1 quantized %",
           "pareto": "Pareto", "run_id": "run id"}


def _number(text: str | None, kind=float):
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None


def _runs(client, exp_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def collect(client, experiment: str) -> tuple[str, list[dict[str, Any]]]:
    """The experiment's id and one row per finished run with a size and a top-1."""
    exp_id = experiment_id(client, experiment, create=False)
    if exp_id is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"--experiment: no experiment {experiment!r} in {client.tracking_uri}"
                        + (f" (it has: {', '.join(names)})" if names else " (it has none)"))
    rows = []
    for run in _runs(client, exp_id, "attributes.status = 'FINISHED'"):
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        if tags.get(ROLE_TAG) == "compare" or "size_mb" not in metrics or "top1_quantized" not in metrics:
            continue
        k = params.get("quantization.types.conv3x3.k") or params.get("quantization.default.k")
        rows.append({
            "run": run.info.run_name,
            "method": tags.get("method", "unknown"),
            "regime": params.get("name", run.info.run_name),
            "k_conv3x3": _number(k, int),
            "mu": _number(params.get("train.mu")),
            "size_mb": metrics["size_mb"],
            "ratio": metrics.get("ratio"),
            "top1_quantized": metrics["top1_quantized"],
            "run_id": run.info.run_id,
        })
    if not rows:
        raise UserError(f"--experiment: {experiment!r} has no finished runs with size_mb and top1_quantized "
                        "metrics (train one with gppq train)")
    rows.sort(key=lambda r: (r["method"], r["size_mb"], -r["top1_quantized"]))
    front = set(pareto_front([(r["size_mb"], r["top1_quantized"]) for r in rows]))
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    return exp_id, rows


def cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if column == "size_mb":
        return f"{value:.3f}"
    if column in ("ratio",):
        return f"{value:.1f}"
    if column == "top1_quantized":
        return f"{value:.2f}"
    if column == "mu":
        return f"{value:g}"
    return str(value)


def table_text(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(CSV, Markdown) of the rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                         for c in COLUMNS])
    right = {"k_conv3x3", "mu", "size_mb", "ratio", "top1_quantized"}
    lines = ["| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row[c], c) for c in COLUMNS) + " |" for row in rows]
    return buffer.getvalue(), "\n".join(lines) + "\n"


def _compare_run(client, exp_id: str) -> str:
    found = _runs(client, exp_id, f"tags.{ROLE_TAG} = 'compare'")
    if found:
        return found[-1].info.run_id
    return client.create_run(exp_id, tags={ROLE_TAG: "compare"}, run_name="compare").info.run_id


def compare(experiment: str, out: str | Path | None = None, uri: str | None = None) -> dict[str, Any]:
    """Collect, write ``compare.csv``, ``compare.md`` and ``pareto.png`` into ``out`` (default
    ``runs/compare/<experiment>``) and log them to the experiment's ``compare`` run."""
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(uri)
    out = Path(out) if out is not None else Path("runs") / "compare" / experiment
    try:
        with mlflow_calls():
            client = client_for(uri)
            exp_id, rows = collect(client, experiment)
            csv_text, markdown = table_text(rows)
            files = [out / "compare.csv", out / "compare.md", out / "pareto.png"]
            write_text_atomic(files[0], csv_text)
            write_text_atomic(files[1], markdown)
            pareto_png(rows, files[2], f"{experiment}: size vs top-1 ({len(rows)} runs)")
            run_id = _compare_run(client, exp_id)
            for path in files:
                client.log_artifact(run_id, str(path))
            client.set_tag(run_id, "compared_runs", str(len(rows)))
            client.set_terminated(run_id, "FINISHED")
    except MlflowException as exc:
        raise UserError(f"MLflow tracking at {uri} failed ({describe_failure(exc)})") from None
    return {"experiment": experiment, "uri": uri, "rows": rows, "files": [str(p) for p in files],
            "compare_run_id": run_id}
