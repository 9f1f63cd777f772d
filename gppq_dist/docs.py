"""The README's reference tables, generated from the code.

Each block of README.md between ``<!-- generated: NAME (make docs) -->`` and
``<!-- end generated: NAME -->`` is the output of ``BLOCKS[NAME]``:

- ``config``: every config key (:class:`~gppq_dist.config.RunConfig`, its sections, every
  registered method's section and layer setting) with its type, default and the
  ``description`` of its pydantic field;
- ``commands``: every command of ``gppq`` (:mod:`gppq_dist.cli`) with its usage, from the
  click parameters typer builds, and the first paragraph of its docstring.

A block between ``<!-- included: docs/FILE.md (COMMAND) -->`` and ``<!-- end included:
docs/FILE.md -->`` is that file, as the benchmark script named by COMMAND wrote it (the
README shows measured tables only through such blocks; ``tests/test_docs.py`` checks that
every file under ``docs/`` is written by a script).

``python -m gppq_dist.docs`` (``make docs``) rewrites the blocks; ``--check`` only compares
them and exits 1 when one differs (``tests/test_docs.py`` checks the same).

Import-light: pydantic and the config schema; the command line is imported when its table
is made.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typing_extensions import TypeVar

from gppq_dist.config import RunConfig
from gppq_dist.errors import UserError
from gppq_dist.methods.registry import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"
# where a method's layer setting goes: quantization.default, .types.<kind>, .names.<regex>
RULE = "quantization.<rule>"


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """``(dotted key, field)`` of every leaf key of ``model``, in field order, the sections
    recursed into; a mapping of settings (``json_schema_extra={"each_key": ...}``) is one
    key, e.g. ``quantization.types.<kind>``."""
    keys: list[tuple[str, FieldInfo]] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += config_keys(field.annotation, f"{key}.")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        each = extra.get("each_key")
        keys.append((f"{key}.<{each}>" if each else key, field))
    return keys


def method_keys() -> list[tuple[str, str, FieldInfo]]:
    """``(method, dotted key, field)`` of every registered method's ``method:`` section."""
    return [(spec.name, f"method.{name}", field)
            for spec in METHODS.values() for name, field in spec.config.model_fields.items()]


def layer_keys() -> list[tuple[list[str], type[BaseModel], str, FieldInfo | None]]:
    """``(methods, layer type, key, field)`` of every field of the registered methods' layer
    settings, each layer type once with the methods that share it; a layer type without
    fields is one row with no field (its docstring says what it is)."""
    methods: dict[type[BaseModel], list[str]] = {}
    for spec in METHODS.values():
        methods.setdefault(spec.layer, []).append(spec.name)
    rows: list[tuple[list[str], type[BaseModel], str, FieldInfo | None]] = []
    for layer, names in methods.items():
        fields = layer.model_fields.items()
        rows += [(names, layer, f"{RULE}.{name}", field) for name, field in fields] or [(names, layer, RULE, None)]
    return rows


def config_table() -> str:
    """The config reference: the run's keys, then the method sections, then the layer settings."""
    run_rows = [_row(key, field) for key, field in config_keys()]
    method_rows = [[f"`{method}`", *_row(key, field)] for method, key, field in method_keys()]
    layer_rows = [[", ".join(f"`{name}`" for name in names),
                   *(_row(key, field) if field else [f"`{key}`", f"`{_type_name(layer)}`", "`{}`",
                                                     _first_paragraph(layer.__doc__, markdown=True)])]
                  for names, layer, key, field in layer_keys()]
    return "\n\n".join([
        _table(["key", "type", "default", "description"], run_rows),
        "The `method` section of each registered method (`method.name` picks it):",
        _table(["method", "key", "type", "default", "description"], method_rows),
        f"The layer settings, the values of the `quantization` rules (`{RULE}` is `quantization.default`, "
        "`quantization.types.<kind>` or `quantization.names.<regex>`):",
        _table(["methods", "key", "type", "default", "description"], layer_rows),
    ])


def commands_table() -> str:
    """Every ``gppq`` command and subcommand: its usage and what it does."""
    import typer

    from gppq_dist.cli import app

    rows = [[f"`{usage(path, command)}`", _first_paragraph(command.help)]
            for path, command in cli_commands(typer.main.get_command(app), ("gppq",))]
    return _table(["command", "what it does"], rows)


def cli_commands(command: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(words, command)`` of every command under ``command`` that is not a group, in the
    order of ``gppq --help`` (hidden ones too: tests/test_docs.py refuses them)."""
    if not hasattr(command, "commands"):
        yield path, command
        return
    for name, sub in command.commands.items():
        yield from cli_commands(sub, (*path, name))


def usage(path: tuple[str, ...], command: Any) -> str:
    """``gppq data fashion-mnist --out DIR [--source DIR] ...``: required parameters plain,
    optional ones in brackets, a repeatable one followed by ``...``."""
    words = list(path)
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        placeholder = param.metavar or param.name.upper()
        if param.param_type_name == "argument":
            word = placeholder
        else:
            flag = next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
            word = flag if param.is_flag else f"{flag} {placeholder}"
        word = word if param.required else f"[{word}]"
        words.append(f"{word}..." if param.multiple or param.nargs == -1 else word)
    return " ".join(words)


def sync_readme(path: str | Path = README, check: bool = False) -> list[str]:
    """Rewrite every generated block of the README at ``path`` with what its generator prints
    now; returns the names of the blocks that differed (``check``: and writes nothing).
    Raises :class:`UserError` naming a marker the README lacks."""
    path = Path(path)
    text = path.read_text()
    changed = []
    for name, generate in BLOCKS.items():
        start, end = block_span(text, name, path)
        fresh = f"\n\n{generate()}\n\n"
        if text[start:end] != fresh:
            changed.append(name)
            text = text[:start] + fresh + text[end:]
    for name in included_files(text):
        source = path.parent / name
        if not source.is_file():
            raise UserError(f"{path}: the included file '{name}' does not exist (run the command its marker names)")
        start, end = block_span(text, name, path, kind="included")
        fresh = f"\n\n{source.read_text().strip()}\n\n"
        if text[start:end] != fresh:
            changed.append(name)
            text = text[:start] + fresh + text[end:]
    if changed and not check:
        path.write_text(text)
    return changed


INCLUDED = re.compile(r"<!-- included: (\S+) \(")


def included_files(text: str) -> list[str]:
    """The files (paths relative to the README) that ``text`` includes."""
    return INCLUDED.findall(text)


def block_span(text: str, name: str, path: str | Path = "README.md", kind: str = "generated") -> tuple[int, int]:
    """Where the block ``name`` of ``text`` lies: between the end of its opening marker and the
    start of its closing one (``kind``: ``generated`` or ``included``)."""
    if kind == "included":
        found = re.search(rf"<!-- included: {re.escape(name)} \([^)]*\) -->", text)
        begin = found.group(0) if found else f"<!-- included: {name} (COMMAND) -->"
    else:
        begin = f"<!-- generated: {name} (make docs) -->"
    end = f"<!-- end {kind}: {name} -->"
    opened = text.find(begin)
    closed = text.find(end, opened + len(begin)) if opened >= 0 else -1
    for marker, found in ((begin, opened), (end, closed)):
        if found < 0:
            raise UserError(f"{path}: the marker '{marker}' is missing (expected the block '{name}' between "
                            f"'{begin}' and '{end}')")
    return opened + len(begin), closed


def _row(key: str, field: FieldInfo) -> list[str]:
    """``key | type | default | description`` of one config key."""
    return [f"`{key}`", *_type_and_default(key, field), " ".join((field.description or "").split())]


def _type_and_default(key: str, field: FieldInfo) -> tuple[str, str]:
    if key == "method":  # validated as the registered methods' union, not as its annotation (Any)
        names = " | ".join(repr(name) for name in METHODS)
        return f"`{names}` or a section", f"`{field.get_default(call_default_factory=True).name}`"
    if key.endswith(">"):  # one key of a mapping (none unless set): its value's type
        return f"`{_type_name(typing.get_args(field.annotation)[1])}`", "none"
    if field.is_required():
        default = "required"
    else:
        value = field.get_default(call_default_factory=True)
        default = "none" if value is None else f"`{_value(value)}`"
    return f"`{_type_name(field.annotation)}`", default


def _type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``'a' | 'b'``, ``[float, float]``, ``dict[str, int]``; a
    pydantic model as its keys (``{d, k}``), the layer-setting type parameter as such."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "any"
    if isinstance(annotation, TypeVar):
        return "layer setting"
    if origin is Literal:
        return " | ".join(repr(value) for value in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    """A default as YAML would read it, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value)).replace("e+", "e")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, BaseModel):
        return _value(value.model_dump())
    return str(value)


def _first_paragraph(text: str | None, markdown: bool = False) -> str:
    """The first paragraph of a docstring on one line; plain text is escaped for markdown
    (outside backticks), reST's double backticks become single ones."""
    paragraph = " ".join(inspect.cleandoc(text or "").split("\n\n")[0].split())
    if markdown:
        return paragraph.replace("``", "`")
    parts = paragraph.split("`")
    return "`".join(part if index % 2 else part.replace("<", "&lt;").replace("*", "\\*")
                    for index, part in enumerate(parts))


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


BLOCKS: dict[str, Callable[[], str]] = {"config": config_table, "commands": commands_table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gppq_dist.docs",
        description="Regenerate the README's generated blocks (config and command reference) from the code.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a block differs from what the code generates")
    parser.add_argument("--readme", type=Path, default=README, help=f"the README (default: {README})")
    args = parser.parse_args(argv)
    try:
        changed = sync_readme(args.readme, check=args.check)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check and changed:
        print(f"{args.readme}: the generated blocks {', '.join(changed)} differ from the code; run `make docs`",
              file=sys.stderr)
        return 1
    print(f"{args.readme}: rewrote the blocks {', '.join(changed)}" if changed else f"{args.readme}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
