"""The README's reference tables are generated from the code (gppq_dist/docs.py) and kept in
step with it: a new config key, method setting or command without its text fails here."""

import re

import pytest
import typer

from gppq_dist import docs
from gppq_dist.cli import app
from gppq_dist.errors import UserError
from tests.conftest import ROOT, gppq_here

README = ROOT / "README.md"


def test_readme_blocks_are_what_the_code_generates():
    stale = docs.sync_readme(README, check=True)
    assert not stale, f"README.md's generated blocks {stale} differ from the code: run `make docs`"


def test_every_config_key_has_a_description():
    keys = docs.config_keys()
    assert {"name", "model.weights", "quantization.types.<kind>", "launch.sbatch", "train.mu"} <= {k for k, _ in keys}
    assert len(keys) > 60
    missing = [key for key, field in keys if not (field.description or "").strip()]
    missing += [f"{key} ({method})" for method, key, field in docs.method_keys()
                if not (field.description or "").strip()]
    missing += [f"{key} ({', '.join(methods)})" for methods, _, key, field in docs.layer_keys()
                if field is not None and not (field.description or "").strip()]
    assert not missing, f"config keys without a description (give their Field a description=...): {missing}"


def test_every_registered_method_has_rows():
    table = docs.config_table()
    for method in docs.METHODS:
        assert f"| `{method}` | `method.name` |" in table


def test_every_command_is_in_the_commands_block_and_in_help():
    text = README.read_text()
    start, end = docs.block_span(text, "commands")
    block = text[start:end]
    commands = [path for path, _ in docs.cli_commands(typer.main.get_command(app), ("gppq",))]
    assert ("gppq", "data", "fashion-mnist") in commands and ("gppq", "mlflow", "sync") in commands
    listed: dict[tuple[str, ...], set[str]] = {}
    for path in commands:
        assert re.search(rf"^\| `{re.escape(' '.join(path))}[ `]", block, re.M), f"{path} missing from README.md"
        for depth in range(1, len(path)):  # gppq --help lists `data`, gppq data --help lists `check`
            group = path[1:depth]
            if group not in listed:
                listed[group] = set(re.findall(r"^[^\w\n]*?\s([a-z][\w-]*)\s{2,}",
                                               gppq_here(*group, "--help", check=True).stdout, re.M))
            assert path[depth] in listed[group], f"`gppq {' '.join(group)} --help` does not list {path[depth]}"


def test_sync_rewrites_a_stale_block_and_names_a_missing_marker(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- generated: config (make docs) -->\nold\n<!-- end generated: config -->\n\n"
                      "<!-- generated: commands (make docs) -->\n<!-- end generated: commands -->\ntail\n")
    assert docs.sync_readme(readme, check=True) == ["config", "commands"]
    assert docs.main(["--check", "--readme", str(readme)]) == 1
    assert "old" in readme.read_text()  # check writes nothing
    assert docs.sync_readme(readme) == ["config", "commands"]
    assert docs.sync_readme(readme, check=True) == [] and readme.read_text().endswith("-->\ntail\n")
    assert docs.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text("# x\n<!-- generated: config (make docs) -->\n<!-- end generated: config -->\n")
    with pytest.raises(UserError, match="'<!-- generated: commands \\(make docs\\) -->' is missing"):
        docs.sync_readme(readme, check=True)


def test_every_file_under_docs_is_written_by_a_script():
    """A figure or table the README shows is a script's output, never a hand-made copy: its
    file name is written by a benchmark or package script that writes to docs/ (``--docs``)."""
    scripts = {path: path.read_text() for path in [*(ROOT / "benchmarks").glob("*.py"),
                                                  *(ROOT / "gppq_dist").rglob("*.py")]}
    writers = {path: text for path, text in scripts.items() if "docs" in text}
    for produced in sorted((ROOT / "docs").iterdir()):
        found = [path.name for path, text in writers.items() if f'"{produced.name}"' in text]
        assert found, f"docs/{produced.name} is written by no script under benchmarks/ or gppq_dist/"
    for name in docs.included_files(README.read_text()):  # and the README includes only such files
        assert name.startswith("docs/") and (ROOT / name).is_file(), name


def test_an_included_file_is_synced_and_a_missing_one_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "table.md").write_text("| a |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    blocks = "".join(f"<!-- generated: {name} (make docs) -->\n<!-- end generated: {name} -->\n" for name in docs.BLOCKS)
    readme.write_text(blocks + "<!-- included: docs/table.md (python benchmarks/x.py --docs) -->\nSTALE-TEXT\n"
                      "<!-- end included: docs/table.md -->\n")
    assert "docs/table.md" in docs.sync_readme(readme)
    assert "\n| 1 |\n" in readme.read_text() and "STALE-TEXT" not in readme.read_text()
    assert docs.sync_readme(readme, check=True) == []
    (tmp_path / "docs" / "table.md").unlink()
    with pytest.raises(UserError, match="docs/table.md"):
        docs.sync_readme(readme, check=True)
