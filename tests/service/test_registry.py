"""The model registry: immutable versions, atomic publication and pointer, the parity gate on activation."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
from multiprocessing import synchronize
from pathlib import Path

import pytest

from service.registry import ACTIVE_FILE, EXPORT_SUBDIR, LOCK_FILE, MODEL_SUBDIR, Registry
from tests.service.conftest import publish_tiny_version


def test_publish_layout_and_permissions(registry: Registry) -> None:
    from training.model_dir import ModelBundle  # torch stays out of the module (spawned readers import it)

    info = publish_tiny_version(registry, ["background", "a", "b"], task_id="t1")
    assert info.name == "v1" and info.classes == ["background", "a", "b"] and info.task_id == "t1"
    assert info.parity_passed and info.parity["max_abs_error"] <= 1e-3
    assert {"model/model.json", "model/weights.pt", "export/model.onnx", "export/manifest.json"} <= set(
        info.files
    )
    version_dir = registry.version_dir("v1")
    for relative, size in info.files.items():
        path = version_dir / relative
        assert path.stat().st_size == size
        assert path.stat().st_mode & 0o777 == 0o644, relative
    for path in [version_dir, *[p for p in version_dir.rglob("*") if p.is_dir()]]:
        assert path.stat().st_mode & 0o777 == 0o755, path
    assert ModelBundle.load(registry.model_dir("v1")).classes == info.classes
    assert (registry.export_dir("v1") / "model.onnx").is_file()
    assert [p.name for p in registry.root.iterdir()] == ["v1"], "no staging leftovers"
    assert registry.active() is None


def test_lookup_errors(registry: Registry) -> None:
    for name in ("v1", "../v1", "v0", "latest", "v1/model"):
        with pytest.raises(KeyError):
            registry.get(name)
        with pytest.raises(KeyError):
            registry.activate(name)


def test_activation_needs_parity(registry: Registry) -> None:
    good = publish_tiny_version(registry, ["background", "a"])
    with registry.staging() as stage:
        shutil.copytree(registry.model_dir(good.name), stage / MODEL_SUBDIR)
        shutil.copytree(registry.export_dir(good.name), stage / EXPORT_SUBDIR)
        manifest_path = stage / EXPORT_SUBDIR / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["parity"] |= {"passed": False, "max_abs_error": 0.5}
        manifest_path.write_text(json.dumps(manifest))
        bad = registry.publish(stage, metrics={"miou_all": 0.1}, task_id=None, base_version="v1", engine="x")
    assert bad.name == "v2" and not bad.parity_passed and bad.metrics == {"miou_all": 0.1}
    registry.activate(good.name)
    with pytest.raises(ValueError, match="did not pass the parity gate.*0.5"):
        registry.activate(bad.name)
    assert registry.active() == good.name
    assert [v.name for v in registry.versions()] == ["v1", "v2"]


def test_failed_write_leaves_nothing(registry: Registry) -> None:
    with pytest.raises(RuntimeError), registry.staging() as stage:
        (stage / MODEL_SUBDIR).mkdir()
        raise RuntimeError("crash while writing")
    with registry.staging() as stage, pytest.raises(ValueError, match="model.json"):
        registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="x")
    assert list(registry.root.iterdir()) == [] and registry.versions() == []


def test_concurrent_publishers_get_distinct_names(registry: Registry) -> None:
    """Racing publishers never overwrite each other: every staging directory becomes its own version."""
    source = publish_tiny_version(registry, ["background", "a"])
    names: list[str] = []
    barrier = threading.Barrier(6)

    def publish() -> None:
        with registry.staging() as stage:
            shutil.copytree(registry.model_dir(source.name), stage / MODEL_SUBDIR)
            shutil.copytree(registry.export_dir(source.name), stage / EXPORT_SUBDIR)
            barrier.wait()
            names.append(
                registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="x").name
            )

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(names, key=lambda n: int(n[1:])) == [f"v{i}" for i in range(2, 8)]
    assert all(v.files == source.files for v in registry.versions()), "every version whole"


def _poll_pointer(
    root: str, ready: synchronize.Event, stop: synchronize.Event, result: multiprocessing.Queue
) -> None:
    registry = Registry(Path(root))
    reads, missing = 0, 0
    ready.set()
    while not stop.is_set():
        name = registry.active()
        reads += 1
        missing += name not in ("v1", "v2")
    result.put((reads, missing))


def test_pointer_never_missing_for_a_polling_reader(active_registry: Registry) -> None:
    """A reader process polling the pointer during 200 replacements always sees a version."""
    second = publish_tiny_version(active_registry, ["background", "a", "b"])
    context = multiprocessing.get_context("spawn")
    ready, stop, result = context.Event(), context.Event(), context.Queue()
    reader = context.Process(target=_poll_pointer, args=(str(active_registry.root), ready, stop, result))
    reader.start()
    assert ready.wait(timeout=60)
    for i in range(200):
        active_registry.activate(second.name if i % 2 == 0 else "v1")
    stop.set()
    reads, missing = result.get(timeout=30)
    reader.join(timeout=30)
    assert reads > 200 and missing == 0
    assert active_registry.active() == "v1"
    assert sorted(p.name for p in active_registry.root.iterdir()) == [LOCK_FILE, ACTIVE_FILE, "v1", "v2"]


def test_remove_stale_stages(registry: Registry) -> None:
    stale = registry.root / ".stage-crashed"
    stale.mkdir()
    assert registry.remove_stale_stages(older_than_s=3600) == []
    assert registry.remove_stale_stages(older_than_s=-1) == [stale] and not stale.exists()
