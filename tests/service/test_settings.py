"""Settings from the environment and .env, their checks, and the torch-free import of the API's side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, get_settings


def test_defaults_and_derived_paths(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)
    assert settings.embedded and settings.redis_url is None and settings.api_key is None
    assert settings.task_database_url == f"sqlite:///{tmp_path.resolve() / 'tasks.db'}"
    assert (settings.registry_dir, settings.staging_dir) == (tmp_path / "registry", tmp_path / "staging")
    assert (settings.train_queue, settings.active_channel) == ("incseg.train", "incseg:active")
    assert settings.ort_threads >= 1 and settings.max_deliveries == 3
    assert all(field.description for field in Settings.model_fields.values()), "the README lists them all"


def test_environment_and_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("INCSEG_SERVE_SIZE=256\nINCSEG_INSTANCE=from-file\n")
    monkeypatch.setenv("INCSEG_INSTANCE", "from-env")
    monkeypatch.setenv("INCSEG_API_KEY", "secret")
    monkeypatch.setenv("INCSEG_STEP_OPTIONS", '{"backbone": "resnet10"}')
    monkeypatch.setenv("INCSEG_REDIS_URL", "redis://127.0.0.1:6379/3")
    settings = Settings(_env_file=env_file)
    assert settings.serve_size == 256 and settings.instance == "from-env", "the environment wins over .env"
    assert (
        settings.api_key is not None
        and settings.api_key.get_secret_value() == "secret"
        and "secret" not in repr(settings)
    )
    assert settings.step_options == {"backbone": "resnet10"} and not settings.embedded
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings() and get_settings().instance == "from-env"
    finally:
        get_settings.cache_clear()


def test_to_env_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(_env_file=None, data_dir=tmp_path / "d", api_key="k", step_options={"epochs": 2})
    for name, value in original.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings(_env_file=None) == original


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"task_soft_time_limit_s": 100, "task_time_limit_s": 50},
            "task_soft_time_limit_s < task_time_limit_s",
        ),
        ({"visibility_timeout_s": 60}, "visibility_timeout_s"),
        ({"orphan_timeout_s": 5, "heartbeat_interval_s": 5}, "orphan_timeout_s"),
        ({"instance": "a b/c"}, "instance"),
        ({"serve_size": 8}, "serve_size"),
    ],
)
def test_bad_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("modules", "absent"),
    [
        ("service.settings, service.db, service.train_queue", ("torch", "training")),
        # the registry writes through training.durable; the archive checks datasets with training.data's
        # torch-free readers
        ("service.registry, service.jobs, service.celery_app", ("torch", "training.model_dir")),
    ],
)
def test_api_side_modules_do_not_import_torch(modules: str, absent: tuple[str, ...]) -> None:
    code = f"import sys, {modules}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
