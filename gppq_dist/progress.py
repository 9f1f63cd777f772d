"""Progress bars and logging: rank 0 talks, other ranks stay quiet."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

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


class Bar:
    """``bar(n, status=...)`` advances the bar; ``active`` says whether anyone sees it
    (callers skip work that only feeds the status text when it is not)."""

    def __init__(self, progress: Progress | None = None, task: int | None = None) -> None:
        self.progress, self.task = progress, task

    @property
    def active(self) -> bool:
        return self.progress is not None

    def __call__(self, steps: int = 1, status: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=steps, status=status)


@contextlib.contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Bar]:
    """Yield a :class:`Bar`: drawn on rank 0 in a terminal, silent elsewhere."""
    if not is_main_process() or not sys.stderr.isatty():
        yield Bar()
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, transient=True) as progress:
        yield Bar(progress, progress.add_task(label, total=total, status=""))
