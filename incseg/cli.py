"""The ``incseg`` command line: thin wrappers over the library functions the service also calls.

The parser and the service commands import no PyTorch: an install with only the ``api`` extra runs
``incseg api`` and ``incseg demo --url``; the training commands import the training stack when they run
and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from export.cli import add_subcommands as add_export_subcommands
from service.cli import add_subcommands as add_service_subcommands
from training.data import DataError, write_synthetic_dataset
from training.data.synth import SCENES
from training.extra import MissingExtraError, require_train_extra
from training.method_spec import BENCH_METHODS, DEFAULT_METHOD, METHOD_NAMES, split_top_level
from training.options import BACKBONE_NAMES, StepOptions

if TYPE_CHECKING:
    from training.trainer import StepProgress

console = Console(stderr=True)


@contextmanager
def progress_bar() -> Iterator:
    """A rich progress bar fed by the trainer's progress callback: iterations, then the phase names."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} it"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("train", total=1, loss=float("nan"))

        def update(p: StepProgress) -> None:
            if p.iteration == 1:
                progress.reset(task, total=p.total_iterations, loss=p.loss)
            description = f"epoch {p.epoch + 1}" if p.phase == "training" else p.phase
            progress.update(task, completed=p.iteration, loss=p.loss, description=description)

        yield update


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    fields = StepOptions.model_fields
    parser.add_argument("--epochs", type=int, default=fields["epochs"].default)
    parser.add_argument("--size", type=int, default=fields["size"].default, help="training crop / eval size")
    parser.add_argument("--batch-size", type=int, default=fields["batch_size"].default)
    parser.add_argument("--lr", type=float, default=None, help="default 0.01 at step 0, 0.001 later")
    parser.add_argument(
        "--min-iterations",
        type=int,
        default=fields["min_iterations"].default,
        help="iteration floor of an incremental step: a small dataset runs more epochs to reach it",
    )
    parser.add_argument(
        "--lr-multipliers",
        type=json.loads,
        default=None,
        help="JSON object overriding the learning-rate multiple of parameter groups (backbone, spatial_path, "
        'head, classifier, new_classes), e.g. \'{"head": 1, "classifier": 1, "new_classes": 1}\'',
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--backbone", default="resnet18", choices=sorted(BACKBONE_NAMES), help="step 0 only")
    parser.add_argument("--context-channels", type=int, default=128, help="step 0 only (BiSeNet width)")
    parser.add_argument("--embed-channels", type=int, default=256, help="step 0 only (embedding width)")
    parser.add_argument(
        "--backbone-weights",
        type=Path,
        default=None,
        help="step 0 only: local torchvision ImageNet weights (.pth); nothing is downloaded",
    )


def _options(args: argparse.Namespace, **extra: Any) -> StepOptions:
    return StepOptions(
        epochs=args.epochs,
        size=args.size,
        batch_size=args.batch_size,
        lr=args.lr,
        min_iterations=args.min_iterations,
        lr_multipliers=args.lr_multipliers,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        workers=args.workers,
        backbone=args.backbone,
        context_channels=args.context_channels,
        embed_channels=args.embed_channels,
        backbone_weights=args.backbone_weights,
        **extra,
    )


def cmd_synth(args: argparse.Namespace) -> int:
    out = write_synthetic_dataset(
        args.out, args.classes, args.train, args.val, args.size, args.seed, args.scene, args.weak_train
    )
    train_labels = "labels.csv (image-level labels)" if args.weak_train else "masks"
    console.print(
        f"wrote {args.classes} classes, {args.train} train images with {train_labels} + {args.val} val "
        f"images with masks to {out}"
    )
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    require_train_extra("incseg step")
    from training.model_dir import supervision_of
    from training.step import run_step

    base = None if args.base.lower() == "none" else Path(args.base)
    started = time.monotonic()
    with progress_bar() as update:
        bundle, scores = run_step(
            base, args.data, args.method, _options(args, setting=args.setting), args.out, update
        )
    record = bundle.history[-1]
    labels = "image-level labels" if supervision_of(record) == "weak" else "masks"
    console.print(
        f"step {record['step']}: + {', '.join(record['classes_added'])} "
        f"({record['train_images']} images with {labels}, {time.monotonic() - started:.0f} s) -> {args.out}"
    )
    pseudo = (record.get("metrics") or {}).get("pseudo_labels")
    if scores is None and pseudo is not None:
        console.print(
            "no validation masks: no mIoU; the pseudo-labels' own statistics instead: "
            f"{pseudo['images']} images, labelled classes found "
            f"{_fraction(pseudo['labelled_classes_found'])}, "
            f"images kept {_fraction(pseudo['complete_fraction'])}"
        )
    if scores is not None:
        table = Table("class", "IoU")
        for name, iou in scores.per_class_iou.items():
            table.add_row(name, "-" if iou is None else f"{100 * iou:.1f}")
        console.print(table)
        console.print(_scores_line(scores.miou_old, scores.miou_new, scores.miou_all))
    return 0


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _scores_line(old: float | None, new: float | None, all_: float | None) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    return f"mIoU old {pct(old)} | new {pct(new)} | all {pct(all_)}"


def _bench(
    args: argparse.Namespace, methods: list[str], out: Path, supervisions: Sequence[str] = ("full",)
) -> dict:
    """Runs the benchmark, writing ``out`` after each method (a long run keeps what it finished)."""
    from training.bench import format_table, run_benchmark, write_results

    started = time.monotonic()

    def write_partial(results: dict) -> None:
        write_results({**results, "seconds_total": round(time.monotonic() - started, 1)}, out)

    with progress_bar() as update:
        results = run_benchmark(
            args.data,
            args.protocol,
            args.setting,
            methods,
            _options(args),
            args.save,
            log=lambda line: console.print(line, markup=False),
            on_progress=update,
            on_method_done=write_partial,
            supervisions=supervisions,
        )
    results["seconds_total"] = round(time.monotonic() - started, 1)
    print(format_table(results))
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    require_train_extra("incseg bench")
    from training.bench import plot_results, write_results

    methods = split_top_level(args.methods, ",")
    results = _bench(args, methods, args.out, split_top_level(args.supervision, ","))
    write_results(results, args.out)
    plot = plot_results(results, args.plot or Path(args.out).with_suffix(".png"))
    console.print(f"results: {args.out}, plot: {plot}, total {results['seconds_total']:.0f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> base step -> one incremental step (FT vs the default method) -> metric table.

    With ``--url`` the same story runs against a running service instead, through HTTP only.
    """
    out = Path(args.out)
    if args.url:
        return _demo_service(args, out)
    require_train_extra("incseg demo without --url")
    from training.bench import plot_results, write_results

    data = out / "data"
    if not (data / "classes.txt").exists():
        write_synthetic_dataset(data, 8, 240, 60, args.size, args.seed)
    args.data, args.protocol, args.setting, args.save = data, "6-2", "overlapped", out / "models"
    results = _bench(args, ["ft", DEFAULT_METHOD], out / "results.json")
    write_results(results, out / "results.json")
    plot_results(results, out / "results.png")
    console.print(f"models in {out / 'models'}; results in {out / 'results.json'}")
    return 0


def _demo_service(args: argparse.Namespace, out: Path) -> int:
    """``incseg demo --url``: base task, a mask task and a weak (image-level labels) task through the API,
    segmenting the same image after each."""
    from service.api_key import local_api_key
    from service.client import DemoOptions, ServiceError, run_demo
    from service.settings import get_settings

    options = DemoOptions(
        epochs=args.epochs, size=args.size, image_size=args.size, batch_size=args.batch_size, seed=args.seed
    )
    api_key = args.api_key or local_api_key(args.url, args.data_dir or get_settings().data_dir)
    try:
        run_demo(args.url, out, options, api_key)
    except ServiceError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="incseg", description="Class-incremental semantic segmentation: train, benchmark, export, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in the project format")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scene",
        choices=sorted(SCENES),
        default="shapes",
        help="shapes: the tables' data; clutter: other shapes and textures, more objects, denser clutter",
    )
    p.add_argument(
        "--weak-train",
        action="store_true",
        help="label the training images with labels.csv (the classes each shows) instead of masks, for a "
        "weakly supervised step; validation keeps its masks",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("step", help="train one incremental step on a dataset folder")
    p.add_argument("--base", required=True, help="model directory of the previous step, or 'none' for step 0")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="dataset folder (project format, VOC or ADE20K); a project folder whose training images have "
        "a labels.csv row but no mask makes a weakly supervised step",
    )
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"one of {', '.join(METHOD_NAMES)}, a combination like mib+sdr, or mib(kd=100)",
    )
    p.add_argument(
        "--setting",
        default="overlapped",
        choices=["disjoint", "overlapped", "sequential"],
        help="overlapped and disjoint: known classes are background in the training masks (the same for one "
        "step: disjoint differs only by dropping images of later steps' classes, and a step has none; star "
        "still weighs its replay by setting, as STAR's code does); sequential: known classes keep their "
        "labels",
    )
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    _add_training_options(p)
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("bench", help="run a class-incremental protocol for several methods")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--protocol", default="15-1", help="e.g. 15-1, 10-2, 100-50, 15-2-3 or [[1,2],[3]]")
    p.add_argument("--setting", default="overlapped", choices=["disjoint", "overlapped", "sequential"])
    p.add_argument(
        "--methods",
        default=",".join(BENCH_METHODS),
        help=f"comma-separated: {', '.join(METHOD_NAMES)}; combinations like mib+sdr; weights: mib(kd=100)",
    )
    p.add_argument(
        "--supervision",
        default="full",
        help="full, weak or full,weak: weak trains the incremental steps from image-level labels derived "
        "from the same images' masks (WILSON's localizer and pseudo-labels); rows of one method share step 0",
    )
    p.add_argument("--out", type=Path, default=Path("results.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    p.add_argument(
        "--save", type=Path, default=None, help="keep each method's model directory after every step"
    )
    _add_training_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="generate data, train a base and one incremental step, print the table")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument(
        "--url",
        default=None,
        help="run the demo against the service at this URL (e.g. http://127.0.0.1:8000): a base task, a task "
        "adding classes from masks, then one adding classes from image-level labels (labels.csv)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("INCSEG_API_KEY"),
        help="the service's API key (default: $INCSEG_API_KEY, else, for a URL on this machine, the key "
        "file of --data-dir if there is one)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory of a service on this machine whose key file (api-key) --url uses "
        "(default INCSEG_DATA_DIR)",
    )
    _add_training_options(p)
    p.set_defaults(
        func=cmd_demo,
        epochs=10,
        size=96,
        batch_size=8,
        backbone="resnet10",
        context_channels=64,
        embed_channels=128,
    )

    add_export_subcommands(sub)
    add_service_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError, MissingExtraError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
