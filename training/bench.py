"""``incseg bench``: a whole class-incremental protocol for several methods, scored like the papers.

The softmax methods start from one shared step-0 model trained with plain cross-entropy (they all
train step 0 the same way; MiB's authors also reused one step-0 model), on which each method's
end-of-step hooks then run (e.g. SDR's prototypes, ALIFE's feature memory). A method whose step 0
is its own (``Method.needs_own_base``: STAR's per-class sigmoids, trained with BCE at step 0 as in
STAR and DKD) trains it itself; its step-0 scores are in its first step. Joint training, the upper
bound, learns every class in one step.

Scores follow the papers' tables: old = background + the base classes ("0-15"), new = the
classes added after step 0, all = every class seen so far; mIoU as fractions in [0, 1].

Supervision (``supervisions``): ``full`` trains every step on masks; ``weak`` trains the incremental
steps on image-level labels derived from the same images' masks (the classes each mask shows, in the
step's training label space), with the method plus WILSON's weak term (``training.methods.weak``), so
full and weak rows compare the same images; step 0 has masks in both and is shared (a weak row is named
``"<method> [weak]"``). A weak row's steps also score its pseudo-labels against the true masks of the
step's training images (``pseudo_miou``: background and the step's classes; ``pseudo_miou_new``: the
step's classes).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.data import (
    Sample,
    SegmentationDataset,
    SegmentationSource,
    WeakItem,
    WeakSegmentationDataset,
    eval_transform,
    label_sets,
    read_source,
    train_transform,
)
from training.data.transforms import PairTransform
from training.methods import Method, StepContext, build_method
from training.methods.alife import FEATURE_MEMORY
from training.methods.sdr import PROTOTYPES
from training.methods.star_memory import STAR_MEMORY
from training.methods.weak import WeakLabels, with_weak_labels
from training.metrics import ConfusionMatrix, SegmentationScores
from training.model_dir import ModelBundle
from training.protocols import Protocol, Setting, train_indices, train_lut, val_indices, val_lut
from training.trainer import ProgressCallback, StepOptions, evaluate, train_step

Log = Callable[[str], None]
SUPERVISIONS = ("full", "weak")


@dataclass
class ProtocolData:
    """A dataset cut into the steps of a protocol (image selection and labels per step)."""

    source: SegmentationSource
    protocol: Protocol
    setting: Setting
    options: StepOptions

    def __post_init__(self) -> None:
        n = len(self.source.classes)
        self.train_labels = label_sets(self.source.train, n, self.source.label_map)
        self.val_labels = label_sets(self.source.val, n, self.source.label_map)
        self.names = [self.source.classes[i] for i in self.protocol.order()]

    def _dataset(
        self, samples: Sequence[Sample], indices: list[int], lut: np.ndarray, transform: PairTransform
    ) -> SegmentationDataset:
        chosen = [samples[i] for i in indices]
        return SegmentationDataset(chosen, len(self.source.classes), lut, transform, self.source.label_map)

    def train_set(self, step: int) -> SegmentationDataset:
        indices = train_indices(self.train_labels, self.protocol, step, self.setting)
        lut = train_lut(self.protocol, step, self.setting)
        return self._dataset(self.source.train, indices, lut, train_transform(self.options.size))

    def weak_train_set(self, step: int, transform: PairTransform | None = None) -> WeakSegmentationDataset:
        """The images of ``train_set(step)`` with image-level labels only: the classes their masks show."""
        indices = train_indices(self.train_labels, self.protocol, step, self.setting)
        train = self.source.train
        samples = [
            Sample(train[i].stem, train[i].image_path, None, frozenset(self.train_labels[i] - {0}))
            for i in indices
        ]
        return WeakSegmentationDataset(
            samples,
            len(self.source.classes),
            train_lut(self.protocol, step, self.setting),
            len(self.protocol.seen(step)),
            transform or train_transform(self.options.size),
            self.source.label_map,
        )

    def masked_train_items(self, step: int) -> WeakSegmentationDataset:
        """The step's training images with their true masks and image labels, at evaluation size."""
        indices = train_indices(self.train_labels, self.protocol, step, self.setting)
        return WeakSegmentationDataset(
            [self.source.train[i] for i in indices],
            len(self.source.classes),
            train_lut(self.protocol, step, self.setting),
            len(self.protocol.seen(step)),
            eval_transform(self.options.size),
            self.source.label_map,
        )

    @torch.no_grad()
    def score_pseudo_labels(
        self, term: WeakLabels, bundle: ModelBundle, teacher: ModelBundle, step: int
    ) -> dict:
        """mIoU of ``term``'s pseudo-labels (at the end of ``step``) against the true training masks.

        Returns:
            ``pseudo_miou`` over background and the step's classes, ``pseudo_miou_new`` over the step's
            classes, and ``pseudo_iou`` per class name.
        """
        device = self.options.torch_device()
        model, old_model = bundle.model.to(device).eval(), teacher.model.to(device).eval()
        confusion = ConfusionMatrix(model.num_classes)
        loader = DataLoader(self.masked_train_items(step), batch_size=self.options.batch_size)
        item: WeakItem
        for item in loader:
            images, image_labels = item.image.to(device), item.image_labels.to(device)
            confusion.update(term.label_images(model, old_model, images, image_labels).cpu(), item.mask)
        iou = confusion.iou()
        num_old = teacher.model.num_classes
        scored = [0, *range(num_old, model.num_classes)]
        names = [bundle.classes[c] for c in scored]
        per_class = {
            n: None if np.isnan(iou[c]) else float(iou[c]) for n, c in zip(names, scored, strict=True)
        }
        new = [v for c, v in zip(scored, per_class.values(), strict=True) if c > 0 and v is not None]
        kept = [v for v in per_class.values() if v is not None]
        return {
            "pseudo_miou": sum(kept) / len(kept) if kept else None,
            "pseudo_miou_new": sum(new) / len(new) if new else None,
            "pseudo_iou": per_class,
        }

    def joint_train_set(self) -> SegmentationDataset:
        last = self.protocol.num_steps - 1
        indices = [i for i, labels in enumerate(self.train_labels) if labels - {0}]
        return self._dataset(
            self.source.train, indices, val_lut(self.protocol, last), train_transform(self.options.size)
        )

    def val_loader(self, step: int) -> DataLoader:
        indices = val_indices(self.val_labels, self.protocol, step)
        dataset = self._dataset(
            self.source.val, indices, val_lut(self.protocol, step), eval_transform(self.options.size)
        )
        return DataLoader(dataset, batch_size=self.options.batch_size, num_workers=self.options.workers)

    def score(self, bundle: ModelBundle, step: int) -> SegmentationScores:
        """Scores a model on the validation images of steps 0..``step`` (old = background + base classes)."""
        device = self.options.torch_device()
        num_base = len(self.protocol.seen(0))
        return evaluate(bundle.model.to(device), self.val_loader(step), bundle.classes, num_base, device)

    def step_names(self, step: int) -> list[str]:
        return [self.source.classes[c] for c in self.protocol.steps[step]]

    def image_bytes(self, step: int) -> int:
        """Bytes of the training images of steps 0..step that a raw-image replay would keep."""
        used = {
            i
            for t in range(step + 1)
            for i in train_indices(self.train_labels, self.protocol, t, self.setting)
        }
        return sum(self.source.train[i].image_path.stat().st_size for i in used)


def memory_bytes(bundle: ModelBundle) -> int:
    """Bytes of the replay state kept in the model directory: SDR's prototypes, ALIFE's feature memory
    and STAR's class statistics.

    (ALIFE's last rotations are kept too, as a record of the step, but nothing replays them.)
    """
    kept = [bundle.state.get(name, {}) for name in (PROTOTYPES, FEATURE_MEMORY, STAR_MEMORY)]
    return sum(t.numel() * t.element_size() for tensors in kept for t in tensors.values())


def run_end_of_step_hooks(
    bundle: ModelBundle, method: Method, train_set: Dataset, options: StepOptions
) -> ModelBundle:
    """Runs ``method``'s end-of-step hooks on a copy of a step-0 model trained by another method."""
    bundle = copy.deepcopy(bundle)
    loader = DataLoader(
        train_set,
        batch_size=options.batch_size,
        shuffle=True,
        num_workers=options.workers,
        generator=torch.Generator().manual_seed(options.seed),
    )
    device = options.torch_device()
    bundle.model.to(device)
    ctx = StepContext(
        bundle.version - 1,
        bundle.model,
        None,
        0,
        bundle.classes,
        loader,
        device,
        bundle.state,
        options.epochs,
    )
    method.on_step_end(ctx)
    bundle.model.cpu()
    bundle.state = ctx.state
    return bundle


def step_record(
    step: int,
    data: ProtocolData,
    bundle: ModelBundle,
    scores: SegmentationScores,
    image_bytes: int,
    seconds: float | None = None,
) -> dict:
    """One step's scores; ``miou_step`` is the mean IoU of the classes this step added (right after it)."""
    added = bundle.history[-1]["classes_added"] if bundle.history else []
    added_iou = [iou for name in added if (iou := scores.per_class_iou.get(name)) is not None]
    return {
        "step": step,
        "classes": list(bundle.classes),
        "classes_added": list(added),
        "miou_old": scores.miou_old,
        "miou_new": scores.miou_new,
        "miou_all": scores.miou_all,
        "miou_step": sum(added_iou) / len(added_iou) if added_iou else None,
        "hiou": scores.hiou,
        "per_class_iou": scores.per_class_iou,
        "seconds": seconds,
        "train_images": bundle.history[-1]["train_images"] if bundle.history else None,
        "iterations": bundle.history[-1].get("iterations") if bundle.history else None,
        "memory_bytes": memory_bytes(bundle),
        "memory_bytes_per_class": round(memory_bytes(bundle) / max(len(bundle.classes) - 1, 1), 1),
        "image_bytes": image_bytes,
    }


def run_benchmark(
    data_dir: Path,
    protocol_spec: str,
    setting: str,
    methods: list[str],
    options: StepOptions,
    save_dir: Path | None = None,
    log: Log = print,
    on_progress: ProgressCallback | None = None,
    on_method_done: Callable[[dict], None] | None = None,
    supervisions: Sequence[str] = ("full",),
) -> dict:
    """Runs the protocol for each method and supervision; returns the ``results.json`` document.

    ``on_method_done`` receives the document after each row (e.g. to write partial results
    of a long run). ``supervisions``: ``full`` and/or ``weak`` (module docstring); the rows of one
    method share its step 0.

    Raises:
        ValueError: Bad protocol, setting, method name or supervision (before any training).
    """
    unknown = sorted(set(supervisions) - set(SUPERVISIONS))
    if unknown or not supervisions:
        raise ValueError(
            f"supervision must be one or more of {', '.join(SUPERVISIONS)}; got {unknown or 'none'}"
        )
    source = read_source(Path(data_dir))
    protocol = Protocol.parse(protocol_spec, len(source.classes) - 1)
    built = {spec: build_method(spec) for spec in methods}
    options = options.model_copy(update={"setting": Setting(setting).value})
    data = ProtocolData(source, protocol, Setting(setting), options)
    last = protocol.num_steps - 1
    results: dict[str, Any] = {
        "protocol": protocol_spec,
        "setting": setting,
        "options": options.model_dump(mode="json"),
        "supervisions": list(supervisions),
        "methods": {},
    }
    weak_unsupported = [spec for spec, m in built.items() if m.trains_all_classes_at_once]
    if "weak" in supervisions and weak_unsupported:
        raise ValueError(f"--supervision weak: {', '.join(weak_unsupported)} trains every class at once")

    shared_base: ModelBundle | None = None
    for spec, method in built.items():
        shares_base = not (method.trains_all_classes_at_once or method.needs_own_base)
        if shared_base is None and shares_base:
            log(f"[base] step 0: {len(data.step_names(0))} classes, shared by the incremental methods")
            started = time.monotonic()
            shared_base, _ = train_step(
                None, data.step_names(0), data.train_set(0), None, build_method("ft"), options, on_progress
            )
            results["base_seconds"] = round(time.monotonic() - started, 1)
        if method.trains_all_classes_at_once:
            started = time.monotonic()
            log(f"[{spec}] one step over all {len(data.names) - 1} classes")
            bundle, _ = train_step(
                None, data.names[1:], data.joint_train_set(), None, method, options, on_progress
            )
            seconds = round(time.monotonic() - started, 1)
            record = step_record(
                last, data, bundle, data.score(bundle, last), data.image_bytes(last), seconds
            )
            _save(save_dir, spec, last, bundle)
            _finish(results, spec, [record], started, on_method_done)
            continue
        started = time.monotonic()
        base_seconds = None
        if shares_base and shared_base is not None:
            base = run_end_of_step_hooks(shared_base, method, data.train_set(0), options)
        else:
            log(f"[{spec}] step 0: {len(data.step_names(0))} classes, its own")
            base, _ = train_step(
                None, data.step_names(0), data.train_set(0), None, method, options, on_progress
            )
            base_seconds = round(time.monotonic() - started, 1)
        base_record = step_record(0, data, base, data.score(base, 0), data.image_bytes(0), base_seconds)
        for supervision in supervisions:
            row = spec if supervision == "full" else f"{spec} [weak]"
            term = WeakLabels() if supervision == "weak" else None
            row_method = with_weak_labels(method, term) if term is not None else method
            bundle, steps = base, [base_record]
            _save(save_dir, row, 0, bundle)
            for step in range(1, protocol.num_steps):
                log(f"[{row}] step {step}: + {', '.join(data.step_names(step))}")
                step_started = time.monotonic()
                train_set = data.weak_train_set(step) if term is not None else data.train_set(step)
                teacher = bundle
                bundle, _ = train_step(
                    bundle, data.step_names(step), train_set, None, row_method, options, on_progress
                )
                seconds = round(time.monotonic() - step_started, 1)  # training and end-of-step hooks
                scores = data.score(bundle, step)
                record = step_record(step, data, bundle, scores, data.image_bytes(step), seconds)
                if term is not None:
                    record |= data.score_pseudo_labels(term, bundle, teacher, step)
                    record["pseudo_label_stats"] = bundle.history[-1]["metrics"]["pseudo_labels"]
                steps.append(record)
                _save(save_dir, row, step, bundle)
            _finish(results, row, steps, started, on_method_done)
            started = time.monotonic()
    return results


def _finish(
    results: dict, row: str, steps: list[dict], started: float, on_method_done: Callable[[dict], None] | None
) -> None:
    """Adds a row (its steps and final scores) to ``results`` and reports the document."""
    final = steps[-1]
    results["methods"][row] = {
        "steps": steps,
        "final": {k: final[k] for k in ("miou_old", "miou_new", "miou_all", "hiou")},
        # the shared step 0 is in base_seconds; a method's own step 0 is in its first row and steps[0]
        "seconds": round(time.monotonic() - started, 1),
    }
    if on_method_done is not None:
        on_method_done(results)


def _save(save_dir: Path | None, spec: str, step: int, bundle: ModelBundle) -> None:
    if save_dir is not None:
        folder = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec).strip("_")
        bundle.save(Path(save_dir) / folder / f"step{step}")


def write_results(results: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def plot_results(results: dict, out: Path) -> Path:
    """Line plot of all-classes mIoU after each step, one line per method (joint dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results["methods"].items():
        steps = result["steps"]
        xs = [s["step"] for s in steps]
        ys = [100 * (s["miou_all"] or 0) for s in steps]
        if len(steps) == 1:
            ax.axhline(ys[0], linestyle="--", color="grey", label=f"{name} (upper bound)")
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU of all seen classes (%)")
    ax.set_title(f"{results['protocol']} {results['setting']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def format_table(results: dict) -> str:
    """The papers' table: old / new / all mIoU (%) after the last step, per method."""
    width = max([len("method"), *map(len, results["methods"])]) + 2
    rows = [f"{'method':<{width}}{'old':>8}{'new':>8}{'all':>8}{'time (s)':>10}"]
    for name, result in results["methods"].items():
        final = result["final"]
        cells = [_percent(final[k]) for k in ("miou_old", "miou_new", "miou_all")]
        rows.append(f"{name:<{width}}{cells[0]:>8}{cells[1]:>8}{cells[2]:>8}{result['seconds']:>10.0f}")
    if "base_seconds" in results:
        rows.append(f"(step 0, shared by the incremental methods: {results['base_seconds']:.0f} s)")
    return "\n".join(rows)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
