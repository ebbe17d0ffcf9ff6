""".env.example lists every setting of service/settings.py and every variable of the compose files, and
its settings lines are valid values that show the defaults."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic_core import PydanticUndefined

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$")


def example_lines() -> list[tuple[str, str]]:
    return [
        (m.group(1), m.group(2))
        for line in (ROOT / ".env.example").read_text().splitlines()
        if (m := LINE.match(line))
    ]


def compose_texts() -> list[str]:
    files = [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy").glob("compose.*.yml"))]
    return [file.read_text() for file in files]


def compose_variables() -> set[str]:
    return {name for text in compose_texts() for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text)}


def test_every_setting_and_compose_variable_is_listed_once() -> None:
    names = [name for name, _ in example_lines()]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    settings = {f"INCSEG_{field.upper()}" for field in Settings.model_fields}
    assert set(names) == settings | compose_variables()


def test_settings_lines_are_valid_and_show_the_defaults(tmp_path: Path) -> None:
    settings_lines = [
        (n, v) for n, v in example_lines() if n.lower().removeprefix("incseg_") in Settings.model_fields
    ]
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in settings_lines))
    loaded = Settings(_env_file=env_file)
    for name, field in Settings.model_fields.items():
        if field.default is not PydanticUndefined and field.default is not None:
            assert getattr(loaded, name) == field.default, name


def test_compose_variables_show_the_compose_defaults() -> None:
    """A variable with one default in every compose file (``${NAME:-default}``) shows that default."""
    defaults: dict[str, set[str]] = {}
    for text in compose_texts():
        for name, value in re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-([^}]*)\}", text):
            defaults.setdefault(name, set()).add(value)
    shown = dict(example_lines())
    single = {name: values.pop() for name, values in defaults.items() if len(values) == 1}
    assert single
    assert {name: shown[name] for name in single} == single
