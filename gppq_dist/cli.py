"""The ``gppq`` command line.

A user's mistake (bad config, missing file, corrupt artifact) prints one ``error:`` line
and exits with status 2; tracebacks are kept for bugs (:mod:`gppq_dist.console`). The
commands torchrun runs on every rank, ``train`` and ``compress``, live below this module
(:mod:`gppq_dist.commands`); nothing in the package imports this one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from gppq_dist import commands
from gppq_dist.commands import ArchOption, ConfigOption, DeviceOption, JsonOption, SetOption, load_run_config
from gppq_dist.console import print_json as _print_json
from gppq_dist.console import run_app, stdout
from gppq_dist.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Global & Progressive Product Quantization of CNNs: size, compress, inspect, evaluate, export.",
)
data_app = typer.Typer(
    no_args_is_help=True, help="Data sets: write the demo or synthetic data, check a data folder before training."
)
app.add_typer(data_app, name="data")
import_app = typer.Typer(
    no_args_is_help=True, help="Bring in models compressed by other tools, as .gppq artifacts."
)
app.add_typer(import_app, name="import")


@app.command()
def size(
    config: Path = ConfigOption,
    arch: Optional[str] = ArchOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Accounted size of the compressed model, per layer, for any torchvision classification
    model (--arch); the model is built on the meta device, so it needs no weights file (a
    torchvision weights name is checked, not read) and no data."""
    from gppq_dist.compress import plan_for
    from gppq_dist.models import create_model
    from gppq_dist.pq.accounting import account

    cfg = load_run_config(config, arch, sets)
    model = create_model(cfg.model.spec, device="meta")
    report = account(model, plan_for(model, cfg))
    label = cfg.model.spec.label
    if as_json:
        _print_json({"arch": label, "num_classes": cfg.model.num_classes, **report.to_dict()})
        return
    table = Table(title=f"{label} ({cfg.name}, {cfg.method.name}): accounted size")
    # CLIP-Q's sparsity pattern (estimated before training), TSQ's input quantizers
    side = any(cost.extra_bytes for cost in report.layers)
    columns = ["layer", "shape", "d", "K", "subvectors", "indices", "index bits", "index B", "codebook B"]
    for column in columns + (["pattern/quantizer B"] if side else []):
        table.add_column(column, justify="left" if column in ("layer", "shape") else "right")
    for cost in report.layers:
        plan = cost.plan
        row = [plan.name, "x".join(map(str, plan.shape)), str(plan.d), str(plan.k), f"{plan.n_subvectors:,}",
               f"{plan.n_indices:,}", str(plan.index_bits), f"{cost.index_bytes:,.0f}", f"{cost.codebook_bytes:,}"]
        table.add_row(*row, *([f"{cost.extra_bytes:,.0f}"] if side else []))
    stdout.print(table)
    stdout.print(
        f"quantized layers: {len(report.layers)}   coded: {report.quantized_bytes:,.0f} B   "
        f"unquantized fp32: {report.unquantized_bytes:,} B ({report.unquantized_params:,} params)"
    )
    stdout.print(
        f"total: [bold]{report.size_mb:.3f} MB[/bold] (MB = 2^20 B)   fp32 model: "
        f"{report.fp32_mb:.2f} MB   ratio: [bold]{report.ratio:.1f}x[/bold]"
    )


# train and compress are what torchrun runs on every rank (python -m gppq_dist.train, ...):
# they live in gppq_dist.commands, below the command line
app.command()(commands.compress)


@app.command()
def inspect(artifact: Path = typer.Argument(..., metavar="FILE", help=".gppq file"),
            as_json: bool = JsonOption) -> None:
    """What an artifact holds: per-layer layout, accounted size and real file size."""
    from gppq_dist.artifact import read_artifact
    from gppq_dist.pq.accounting import layer_cost

    loaded = read_artifact(artifact)
    file_bytes = artifact.stat().st_size
    layers = [layer_cost(plan).to_dict() for plan in loaded.layers]
    info = {
        "arch": loaded.arch,
        "num_classes": loaded.num_classes,
        "method": loaded.info.get("method"),
        "accounted_mb": loaded.accounted_bytes / 2**20,
        "accounted_bytes": loaded.accounted_bytes,
        "file_bytes": file_bytes,
        "file_over_accounted": file_bytes / loaded.accounted_bytes,
        "ratio": loaded.info["fp32_bytes"] / loaded.accounted_bytes,
        "gamma": loaded.info.get("gamma"),
        "layers": layers,
    }
    if as_json:
        _print_json(info)
        return
    table = Table(title=f"{artifact} ({loaded.arch}, {info['method']})")
    for column in ("layer", "shape", "d", "K", "bits", "index B", "codebook B"):
        table.add_column(column, justify="left" if column in ("layer", "shape") else "right")
    for layer in layers:
        table.add_row(layer["name"], "x".join(map(str, layer["shape"])), str(layer["d"]), str(layer["k"]),
                      str(layer["index_bits"]), f"{layer['index_bytes']:,.0f}", f"{layer['codebook_bytes']:,}")
    stdout.print(table)
    stdout.print(
        f"accounted {info['accounted_mb']:.3f} MB ({info['accounted_bytes']:,.0f} B), file {file_bytes:,} B "
        f"({info['file_over_accounted']:.3f}x accounted), ratio {info['ratio']:.1f}x"
    )


@import_app.command("kill-the-bits")
def import_kill_the_bits(
    source: Path = typer.Argument(..., metavar="FILE.pth",
                                  help="their compressed .pth (e.g. resnet18_small_blocks.pth)"),
    arch: str = typer.Option(..., "--arch", metavar="resnet18|resnet50", help="resnet18 or resnet50"),
    out: Path = typer.Option(..., "--out", metavar="FILE.gppq", help="the .gppq to write"),
) -> None:
    """A model compressed by "And the Bit Goes Down" (facebookresearch/kill-the-bits) as a .gppq
    artifact: their fp16 codebooks and assignments unchanged, BN and the stem beside them.
    Read with weights_only (nothing in the file runs). Continue training it with
    model.weights: FILE.gppq and the matching quantization rules."""
    from gppq_dist.artifact import write_artifact
    from gppq_dist.interop.kill_the_bits import import_kill_the_bits as convert

    artifact = convert(source, arch)
    written = write_artifact(artifact, out)
    source_bytes = source.stat().st_size
    stdout.print(
        f"{out}: {artifact.arch}, {len(artifact.layers)} coded layers, accounted {artifact.accounted_bytes / 2**20:.3f} MB "
        f"({artifact.accounted_bytes:,.0f} B), file {written:,} B; {source} {source_bytes:,} B "
        f"(ratio {artifact.info['fp32_bytes'] / artifact.accounted_bytes:.1f}x)", markup=False, highlight=False)


@app.command("eval")
def evaluate_artifact(
    artifact: Path = typer.Argument(..., metavar="FILE", help=".gppq file"),
    data: Path = typer.Option(..., "--data", metavar="DIR",
                              help="folder with val/<class>/* (or class folders directly)"),
    batch_size: int = typer.Option(256, "--batch-size", metavar="N"),
    workers: int = typer.Option(2, "--workers", metavar="N"),
    as_json: bool = JsonOption,
) -> None:
    """Top-1/top-5 of the model an artifact rebuilds, on a labelled image folder."""
    from gppq_dist.artifact import read_artifact, rebuild_model
    from gppq_dist.data.folder import image_folder, loader, val_transform
    from gppq_dist.evaluate import evaluate

    loaded = read_artifact(artifact)
    dataset = image_folder(data, "val", val_transform(loaded.info["preprocess"]), key="--data")
    if len(dataset.classes) != loaded.num_classes:
        raise UserError(f"--data: '{data}' has {len(dataset.classes)} classes, the model {loaded.num_classes}")
    metrics = evaluate(rebuild_model(loaded), loader(dataset, batch_size, workers, shuffle=False))
    if as_json:
        _print_json({"artifact": str(artifact), **metrics})
        return
    stdout.print(f"{artifact}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                 f"({metrics['images']} images)")


@app.command("export")
def export_artifact(
    artifact: Path = typer.Argument(..., metavar="FILE", help=".gppq file"),
    out: Path = typer.Option(..., "--out", metavar="MODEL.onnx", help="the file to write, e.g. MODEL.onnx"),
    export_format: str = typer.Option("onnx", "--format", metavar="onnx", help="onnx (the one format so far)"),
    opset: Optional[int] = typer.Option(None, "--opset", metavar="N", help="ONNX opset, 18 to 20 (default 18)"),
    dense: bool = typer.Option(False, "--dense", help="store the decoded fp32 weights instead: an ordinary "
                               "export, for comparison"),
) -> None:
    """The compressed model as an ONNX file of about its accounted size: the artifact's fp16
    codebooks and bit-packed indices are its initializers, and the graph decodes each weight
    with standard operators (ONNX Runtime does it once, when the session starts); TSQ's input
    quantizers are graph ops. Needs the export extra (the onnx and onnxruntime packages)."""
    from gppq_dist.artifact import read_artifact
    from gppq_dist.export.onnx import export_onnx, require_onnx

    if export_format != "onnx":
        raise UserError(f"--format: expected onnx, got {export_format!r}")
    require_onnx()
    written = export_onnx(read_artifact(artifact), out, opset=opset, dense=dense)
    weights = "dense fp32 weights" if dense else f"{written.decoded_layers} coded weights decoded in the graph"
    stdout.print(f"{out}: ONNX opset {written.opset}, {weights}, {written.file_bytes:,} B "
                 f"({written.over_accounted:.3f}x the accounted {written.accounted_bytes:,.0f} B)",
                 markup=False, highlight=False)


@data_app.command("digits")
def data_digits(
    out: Path = typer.Option(Path("data/digits"), "--out", metavar="DIR", help="output folder"),
    image_size: int = typer.Option(32, "--size", metavar="N", help="side of the square JPEGs"),
    seed: int = typer.Option(0, "--seed", metavar="S", help="seed of the train/val split"),
) -> None:
    """Write scikit-learn's digits as an ImageNet-style JPEG folder (train/ and val/)."""
    from gppq_dist.data.digits import write_digits

    manifest = write_digits(out, size=image_size, seed=seed)
    stdout.print(f"{out}: {manifest['train']} train and {manifest['val']} val images, 10 classes")


@data_app.command("fashion-mnist")
def data_fashion_mnist(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="output folder (train/, val/, test/ of class folders)"),
    source: Path = typer.Option(Path("/usr/share/datasets/fashion-mnist"), "--source", metavar="DIR",
                                help="folder with the four IDX files (Debian's dataset-fashion-mnist puts them here)"),
    val: int = typer.Option(5000, "--val", min=0, metavar="N",
                            help="training images held out as val/ (stratified by class)"),
    seed: int = typer.Option(0, "--seed", metavar="S", help="seed of the val split: same seed, same bytes"),
) -> None:
    """Write Fashion-MNIST (70,000 28x28 greyscale images, 10 classes) as PNG class folders:
    train/, a stratified val/ held out of the training images, and test/ (score it once)."""
    from gppq_dist.data.fashion_mnist import write_fashion_mnist

    manifest = write_fashion_mnist(out, source, val=val, seed=seed)
    stdout.print(f"{out}: {manifest['train']:,} train, {manifest['val']:,} val and {manifest['test']:,} test "
                 "images, 10 classes", markup=False, highlight=False)


@data_app.command("synthetic")
def data_synthetic(
    classes: int = typer.Option(..., "--classes", min=1, metavar="N",
                                help="number of classes (folders c000, c001, ...)"),
    per_class: int = typer.Option(..., "--per-class", min=1, metavar="M", help="train images per class"),
    size: str = typer.Option(..., "--size", metavar="WxH", help="image width x height in pixels, e.g. 500x375"),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="output folder"),
    val_per_class: Optional[int] = typer.Option(
        None, "--val-per-class", min=1, metavar="V", help="val images per class; default: per-class / 5, at least 1"
    ),
    seed: int = typer.Option(0, "--seed", metavar="S", help="same seed, same bytes"),
) -> None:
    """Write an ImageNet-layout folder of seeded synthetic JPEGs (train/c000/*.JPEG, val/...; same
    seed, same bytes), for tests and loader benchmarks."""
    from gppq_dist.data.synthetic import write_synthetic

    width, height = _image_size(size)
    counts = write_synthetic(out, classes, per_class, size=(width, height), val_per_class=val_per_class, seed=seed)
    stdout.print(f"{out}: {counts['train']} train and {counts['val']} val images, {classes} classes, "
                 f"{width}x{height}")


@data_app.command("check")
def data_check(
    folder: Path = typer.Argument(..., metavar="DIR",
                                  help="data root with train/<class>/* and val/<class>/* (or class folders)"),
    train_list: Optional[Path] = typer.Option(None, "--train-list", metavar="FILE",
                                              help="'path label' file list for train"),
    val_list: Optional[Path] = typer.Option(None, "--val-list", metavar="FILE", help="'path label' file list for val"),
    workers: int = typer.Option(2, "--workers", min=0, metavar="N",
                                help="decoding processes (0: decode in this process)"),
    as_json: bool = JsonOption,
) -> None:
    """Pre-flight check of a data folder: bad images, stray files, empty or unshared classes.

    Decodes every image once (PIL) and reports corrupt, truncated and non-image files, empty
    class folders and classes that train and val do not share; exit status 1 when anything is
    found. The report is cached (in DIR/.gppq_check, or the user cache when DIR is read-only
    or a flat class folder), so checking an unchanged folder again decodes nothing.
    """
    from gppq_dist.data.check import check_folder, default_cache_dir

    report = check_folder(folder, str(train_list) if train_list else None, str(val_list) if val_list else None,
                          workers, cache_dir=default_cache_dir(folder))
    if as_json:
        _print_json(report.to_dict())
    else:
        # Plain text, not rich: file names may hold [brackets] that rich would read as markup.
        sys.stdout.write(report.summary() + "\n")
    if not report.ok:
        raise typer.Exit(1)


def _image_size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> ``(500, 375)``; anything else is a one-line user error."""
    match = re.fullmatch(r"\s*([1-9]\d*)\s*[xX]\s*([1-9]\d*)\s*", text)
    if match is None:
        raise UserError(f"--size: expected WIDTHxHEIGHT in pixels, e.g. 500x375, got {text!r}")
    return int(match.group(1)), int(match.group(2))


app.command()(commands.train)


@app.command("fetch-weights")
def fetch_weights(
    arch: str = typer.Argument(..., help="torchvision model name, e.g. resnet50"),
    name: str = typer.Argument("DEFAULT", help="weights name: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, ..."),
) -> None:
    """Download torchvision's pretrained weights into its cache ($TORCH_HOME), once, before
    any run (runs never download: many ranks would race, and nodes often have no network)."""
    from gppq_dist.models import fetch_weights as fetch

    try:
        path = fetch(arch, name)
    except OSError as exc:  # no network, a proxy, a full disk (urllib's errors are OSErrors)
        raise UserError(f"fetching {arch} {name} failed: {exc}") from None
    stdout.print(f"{path}", markup=False, highlight=False)


@app.command()
def pretrain(
    config: Path = ConfigOption,
    force: bool = typer.Option(False, "--force", help="train again even if a cached baseline fits"),
    sets: Optional[list[str]] = SetOption,
    device: str = DeviceOption,
) -> None:
    """Train the uncompressed baseline (cached in the run folder, by its settings)."""
    from gppq_dist.pretrain import pretrain as run_pretrain

    summary = run_pretrain(load_run_config(config, None, sets), force=force, device=device)
    stdout.print(f"baseline {summary['weights']}: top-1 {summary['top1']:.2f}%"
                 + (" (cached)" if summary["cached"] else ""))


@app.command()
def demo(
    config: Path = typer.Option(Path("configs/demo_digits.yaml"), "--config", "-c", metavar="CFG"),
    nproc: int = typer.Option(2, "--nproc", min=1, metavar="N", help="processes for the G&P PQ stage (torchrun for "
                              "N > 1; on GPUs at most one per visible GPU)"),
    sets: Optional[list[str]] = SetOption,
    device: str = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="auto: on the GPUs when CUDA is "
                               "visible (--nproc cut to one process per GPU), else the CPU; cpu; cuda"),
) -> None:
    """The whole flow on the digits data: data, baseline (cached), direct PQ, G&P PQ, table."""
    from gppq_dist.demo import run_demo

    rows = run_demo(load_run_config(config, None, sets), config, sets or [], nproc, device)
    table = Table(title="demo: ResNet-18 on digits, compressed")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*[f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
                        for v in row.values()])
    stdout.print(table)


from gppq_dist.launch.cli import register as register_launch  # noqa: E402  (gppq submit, gppq sweep)

register_launch(app)

from gppq_dist.tracking.cli import register as register_tracking  # noqa: E402  (gppq mlflow sync, gppq compare)

register_tracking(app)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv, prog_name="gppq")


if __name__ == "__main__":
    main()
