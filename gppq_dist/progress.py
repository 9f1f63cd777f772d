"""Progress bars and logging: rank 0 talks, other ranks stay quiet."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or record.levelno >= logging.WARNING


def setup_logging(verbose: bool = False) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.addFilter(_RankZeroFilter())
    # Other libraries speak only when it matters (faiss logs its CPU-feature probing at INFO).
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("gppq_dist").setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, **fields)``; a bar on rank 0 in a terminal, silent elsewhere."""
    if not is_main_process() or not sys.stderr.isatty():
        yield lambda *args, **kwargs: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total, status="")

        def advance(steps: int = 1, status: str = "") -> None:
            progress.update(task, advance=steps, status=status)

        yield advance
