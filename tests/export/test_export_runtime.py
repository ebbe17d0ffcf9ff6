"""open_runtime: backend choice, read-only opening, thread counts, closing under load, CLI predict, bench."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.benchmark import benchmark_runtimes
from export.cli import add_subcommands, parse_size
from export.manifest import MANIFEST_FILE, is_export_dir
from export.runtime import (
    OrtRuntime,
    RuntimeClosedError,
    SegmentationRuntime,
    TorchRuntime,
    available_backends,
    ensure_export,
    export_dir_for,
    open_runtime,
    physical_cores,
    resolve_backend,
)
from tests.helpers import save_tiny_model

SIZE = (64, 64)
CLASSES = ["background", "cat", "dog"]
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runtime") / "model"
    return save_tiny_model(path, CLASSES, history=[{"step": 0}, {"step": 1}, {"step": 2}])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incseg")
    add_subcommands(parser.add_subparsers(required=True))
    return parser


@pytest.mark.skipif(not NO_GPU, reason="on a GPU machine auto prefers a GPU backend")
def test_auto_picks_ort_cpu_without_a_gpu(model_dir: Path) -> None:
    assert available_backends() == ["ort-cpu", "torch"]
    assert resolve_backend("auto") == resolve_backend("ort") == "ort-cpu"
    for name in ("trt", "ort-cuda"):
        with pytest.raises(ValueError, match="not usable here"):
            resolve_backend(name)
    with open_runtime(model_dir, size=SIZE) as runtime:
        assert isinstance(runtime, OrtRuntime) and runtime.backend == "ort-cpu"


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``path`` with its size and modification time."""
    return {
        str(item.relative_to(path)): (item.stat().st_size, item.stat().st_mtime_ns)
        for item in path.rglob("*")
    }


def test_open_runtime_never_writes_into_the_model_dir(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model", CLASSES, history=[{"step": 0}])
    before = _tree(model_dir)
    with open_runtime(model_dir, "ort-cpu", size=SIZE) as runtime:
        scratch = runtime.scratch_dir
        assert runtime.version == "v1" and runtime.classes == CLASSES and runtime.size == SIZE
        assert scratch is not None and is_export_dir(scratch / "export")
    assert _tree(model_dir) == before  # exported into a temporary directory ...
    assert not scratch.exists()  # ... which close removed


def test_ensure_export_caches_once_and_open_only_reads_it(model_dir: Path) -> None:
    export_dir = ensure_export(model_dir, SIZE)
    assert export_dir == export_dir_for(model_dir, SIZE) and is_export_dir(export_dir)
    stamp = (export_dir / MANIFEST_FILE).stat().st_mtime_ns
    assert ensure_export(model_dir, SIZE) == export_dir
    before = _tree(model_dir)
    with open_runtime(model_dir, "ort-cpu", size=SIZE) as runtime:
        assert runtime.version == "v3" and runtime.scratch_dir is None  # the cached export, as it is
    with open_runtime(export_dir, "ort-cpu") as runtime:
        assert runtime.version == "v3" and runtime.size == SIZE
    assert _tree(model_dir) == before
    assert (export_dir / MANIFEST_FILE).stat().st_mtime_ns == stamp  # reused, not re-exported
    with pytest.raises(ValueError, match="exported at 64x64"):
        open_runtime(export_dir, "ort-cpu", size=(128, 128))


def test_ort_sessions_use_the_given_thread_count(model_dir: Path) -> None:
    export_dir = ensure_export(model_dir, SIZE)
    with open_runtime(export_dir, "ort-cpu", threads=1) as runtime:
        assert isinstance(runtime, OrtRuntime) and runtime.threads == 1
        options = runtime.session.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    with open_runtime(export_dir, "ort-cpu") as runtime:
        assert isinstance(runtime, OrtRuntime) and runtime.threads == physical_cores()


def test_opening_an_export_imports_neither_torch_nor_the_training_stack(model_dir: Path) -> None:
    """Only ``training.durable`` (torch-free: the manifest is written through it) may come along."""
    export_dir = ensure_export(model_dir, SIZE)
    script = (
        "import sys\n"
        "from export.runtime import open_runtime\n"
        f"with open_runtime({str(export_dir)!r}, 'ort-cpu') as runtime:\n"
        "    runtime.warmup()\n"
        "allowed = {'training', 'training.durable'}\n"
        "stack = (n for n in sys.modules if n.split('.')[0] in ('torch', 'training') and n not in allowed)\n"
        "print(sorted(stack))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


class _GatedSession:
    """Wraps an ONNX Runtime session: each ``run`` announces itself, then waits for the gate to open."""

    def __init__(self, session) -> None:
        self.session = session
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(30)
        return self.session.run(*args, **kwargs)


def test_close_waits_for_calls_in_flight(model_dir: Path) -> None:
    runtime = open_runtime(ensure_export(model_dir, SIZE), "ort-cpu", threads=1)
    assert isinstance(runtime, OrtRuntime)
    gated = runtime.session = _GatedSession(runtime.session)
    batch = np.zeros((2, 3, *SIZE), np.float32)
    results = []
    caller = threading.Thread(target=lambda: results.append(runtime.predict_logits(batch)))
    caller.start()
    assert gated.entered.wait(30)

    assert runtime.close(timeout=0.2) is False  # a call is in flight: nothing released yet
    assert runtime.closed and runtime.session is gated
    with pytest.raises(RuntimeClosedError, match="closed"):
        runtime.predict([np.zeros((8, 8, 3), np.uint8)])
    closer_done = threading.Event()

    def close_then_note() -> None:
        runtime.close()
        closer_done.set()

    closer = threading.Thread(target=close_then_note)
    closer.start()
    assert not closer_done.wait(0.2)  # close() blocks while the call runs
    gated.gate.set()
    caller.join(30)
    closer.join(30)
    assert closer_done.is_set() and runtime.session is None  # released after the last call returned
    assert results[0].shape == (2, len(CLASSES), *SIZE)
    assert runtime.close() is True  # idempotent


def test_close_under_concurrent_predicts_never_breaks_a_call(model_dir: Path) -> None:
    runtime = open_runtime(ensure_export(model_dir, SIZE), "ort-cpu", threads=1)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    outcomes: list[str] = []
    started = threading.Barrier(5)

    def client() -> None:
        started.wait()
        while True:
            try:
                (mask,) = runtime.predict([image])
            except RuntimeClosedError:
                outcomes.append("refused")
                return
            except Exception as error:  # the old bug: 'NoneType' object has no attribute 'run'
                outcomes.append(f"broken: {error!r}")
                return
            outcomes.append("ok" if mask.shape == (50, 70) else f"bad shape {mask.shape}")

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    started.wait()
    while outcomes.count("ok") < 8:
        threading.Event().wait(0.005)
    assert runtime.close() is True
    for thread in clients:
        thread.join(30)
    assert set(outcomes) == {"ok", "refused"} and outcomes.count("refused") == 4


def test_torch_backend_needs_the_model_dir(model_dir: Path, tmp_path: Path) -> None:
    with open_runtime(model_dir, "torch", size=SIZE) as runtime:
        assert isinstance(runtime, TorchRuntime) and runtime.version == "v3"
    export_dir = export_dir_for(model_dir, SIZE)
    if not is_export_dir(export_dir):
        open_runtime(model_dir, "ort-cpu", size=SIZE).close()
    with pytest.raises(ValueError, match="model directory"):
        open_runtime(export_dir, "torch")
    with pytest.raises(FileNotFoundError, match="neither"):
        open_runtime(tmp_path, "auto")
    with pytest.raises(ValueError, match="unknown backend"):
        open_runtime(model_dir, "tensorflow")


@pytest.mark.parametrize("backend", ["ort-cpu", "torch"])
def test_predict_returns_masks_at_original_sizes(model_dir: Path, backend: str) -> None:
    rng = np.random.default_rng(0)
    shapes = [(97, 131), (300, 20), (64, 64), (5, 7)]
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    with open_runtime(model_dir, backend, size=SIZE) as runtime:
        assert isinstance(runtime, SegmentationRuntime)
        runtime.warmup()
        masks = runtime.predict(images)
        logits = runtime.predict_logits(np.zeros((2, 3, *SIZE), np.float32))
        assert runtime.predict([]) == []
    assert [mask.shape for mask in masks] == shapes
    assert all(mask.dtype == np.uint8 and mask.max() < len(CLASSES) for mask in masks)
    assert logits.shape == (2, len(CLASSES), *SIZE) and logits.dtype == np.float32


def test_cli_predict_writes_masks_and_overlays(model_dir: Path, tmp_path: Path, capsys) -> None:
    paths = []
    for name, shape in [("wide.png", (40, 90)), ("tall.jpg", (90, 30))]:
        Image.fromarray(np.full((*shape, 3), 90, np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "out"
    args = _parser().parse_args(
        ["predict", "--model", str(model_dir), *paths, "--out", str(out), "--size", "64x64"]
    )
    assert args.func(args) == 0
    for stem, shape in [("wide", (40, 90)), ("tall", (90, 30))]:
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.mode == "P" and mask.size == (shape[1], shape[0])
        assert Image.open(out / f"{stem}_overlay.png").size == (shape[1], shape[0])
    printed = capsys.readouterr().out
    assert "wide.png (90x40)" in printed and "%" in printed and "ort-cpu" in printed
    missing = _parser().parse_args(["predict", "--model", str(model_dir), "nope.png", "--out", str(out)])
    assert missing.func(missing) == 2


def test_bench_runtime_json_shape(model_dir: Path, tmp_path: Path) -> None:
    report = benchmark_runtimes(model_dir, SIZE, iters=2, batches=(1, 2), backends=["ort-cpu", "torch"])
    assert set(report["backends"]) == {"ort-cpu", "torch"}
    for result in report["backends"].values():
        assert set(result["batch"]) == {"1", "2"}
        for entry in result["batch"].values():
            assert set(entry) >= {"p50_ms", "p90_ms", "images_per_s"}
            assert 0 < entry["p50_ms"] <= entry["p90_ms"] and entry["images_per_s"] > 0
    assert report["size"] == list(SIZE) and report["device"]["cpu"]
    assert set(report["ratios_vs_torch"]) == {"ort-cpu"} and set(report["ratios_vs_torch"]["ort-cpu"]) == {
        "1",
        "2",
    }

    out = tmp_path / "bench.json"
    args = _parser().parse_args(
        ["bench-runtime", "--model", str(model_dir), "--size", "64x64", "--iters", "2", "--json", str(out)]
    )
    assert args.func(args) == 0
    written = json.loads(out.read_text())
    assert set(written) >= {"backends", "size", "device", "ratios_vs_torch"}
    assert set(written["backends"]) == set(available_backends())


def test_parse_size() -> None:
    assert parse_size("512x256") == (512, 256)
    assert parse_size("384") == (384, 384)
    for bad in ("axb", "16x16", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
