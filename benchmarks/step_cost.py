"""Step cost as steps accumulate: seconds per iteration of the last step over the first, in one run.

Command (about 10 minutes per method on 2 CPU cores at the defaults)::

    .venv/bin/python benchmarks/step_cost.py --data synth20 --methods mib,star \
        --out benchmarks/step-cost-cpu.json

For each method:

1. the protocol (15-1 overlapped by default) runs once through ``training.bench.run_benchmark``, which keeps
   every step's model directory;
2. the first incremental step (from the step-0 model, on step 1's data) and the last one (from the model
   before it, on its data) are trained again, alternately, ``--repeats`` times each, with the library's
   ``train_step`` (what ``incseg step`` and the worker call): the step's set-up passes, its iterations and
   its end-of-step hooks, everything a task pays for except loading and saving;
3. it prints the median seconds per iteration of both and their ratio (goal for the default method:
   at most 1.2).

Every step runs at the iteration floor (``--iterations``; the steps of 15-1 have fewer images than that),
so the two steps do equal work but for what the method keeps per class: classifier rows, prototypes,
feature memories. Alternating the two puts both under the same machine load, so the ratio holds on a
busy machine where the absolute times do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from training.bench import ProtocolData, run_benchmark
from training.data import read_source
from training.method_spec import split_top_level
from training.methods import build_method
from training.model_dir import ModelBundle
from training.options import StepOptions
from training.protocols import Protocol, Setting
from training.trainer import StepProgress, train_step


def time_step(
    data: ProtocolData, step: int, base_dir: Path, method_spec: str, options: StepOptions
) -> tuple[float, int]:
    """Trains ``step`` again from the saved model before it; returns (seconds, iterations)."""
    base = ModelBundle.load(base_dir, aux=True)
    method = build_method(method_spec)
    iterations = 0

    def count(progress: StepProgress) -> None:
        nonlocal iterations
        iterations = max(iterations, progress.iteration)

    started = time.perf_counter()
    train_step(base, data.step_names(step), data.train_set(step), None, method, options, count)
    return time.perf_counter() - started, iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--protocol", default="15-1")
    parser.add_argument("--setting", default="overlapped")
    parser.add_argument("--methods", default="mib,star")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--iterations", type=int, default=60, help="iteration floor of every incremental step"
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs of step 0 and of each step before the floor"
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("runs/step-cost"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    options = StepOptions(
        epochs=args.epochs,
        size=args.size,
        batch_size=8,
        min_iterations=args.iterations,
        backbone="resnet10",
        context_channels=64,
        embed_channels=128,
        setting=Setting(args.setting).value,
    )
    source = read_source(args.data)
    protocol = Protocol.parse(args.protocol, len(source.classes) - 1)
    data = ProtocolData(source, protocol, Setting(args.setting), options)
    last = protocol.num_steps - 1
    report = {"protocol": args.protocol, "setting": args.setting, "options": options.model_dump(mode="json")}
    for spec in split_top_level(args.methods, ","):
        save = args.work / spec
        run_benchmark(
            args.data, args.protocol, args.setting, [spec], options, save_dir=save, log=lambda _: None
        )
        models = save / next(p.name for p in save.iterdir() if p.is_dir())  # the spec's folder
        per_iteration: dict[int, list[float]] = {1: [], last: []}
        runs = []
        for repeat in range(args.repeats):
            for step in (1, last):
                seconds, iterations = time_step(data, step, models / f"step{step - 1}", spec, options)
                per_iteration[step].append(seconds / iterations)
                runs.append(
                    {"repeat": repeat, "step": step, "seconds": round(seconds, 2), "iterations": iterations}
                )
        first, final = (statistics.median(per_iteration[s]) for s in (1, last))
        report[spec] = {
            "runs": runs,
            "median_s_per_iteration": {"step1": round(first, 4), f"step{last}": round(final, 4)},
            "ratio": round(final / first, 3),
        }
        print(
            f"{spec}: step {last} / step 1 = {final / first:.2f} "
            f"(median s/iteration {final:.3f} / {first:.3f})"
        )
        print(
            "  runs: " + ", ".join(f"step {r['step']} {r['seconds']} s / {r['iterations']} it" for r in runs)
        )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
