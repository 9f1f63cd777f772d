"""What every command line of the package shares: the terminal, JSON output, and how a
user's mistake ends a command (one ``error:`` line, exit status 2; tracebacks are kept for
bugs)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from gppq_dist.errors import UserError

stdout = Console()
if not stdout.is_terminal:  # logs and pipes get whole table rows, not 80-column wraps
    stdout = Console(width=160)


def print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str) -> None:
    """Run a typer app as a program: logging set up, a :class:`UserError` as one line."""
    from gppq_dist.progress import setup_logging

    setup_logging()
    try:
        app(args=argv, prog_name=prog_name)
    except UserError as exc:
        message = Text.assemble(("error: ", "bold red"), str(exc))
        Console(stderr=True).print(message, highlight=False, soft_wrap=True)
        sys.exit(2)
