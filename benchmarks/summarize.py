"""Tables and a figure from ``incseg bench`` result files: several protocols, several data seeds.

Command (the tables of BENCHMARKS.md "Every method, three protocols, two data seeds")::

    .venv/bin/python benchmarks/summarize.py --figure benchmarks/synth20-96px-summary.png \\
        "15-1 overlapped" 0 benchmarks/synth20-15-1-overlapped-96px-seed0.json \\
            benchmarks/synth20-15-1-overlapped-96px-seed0-star.json \\
        "15-1 overlapped" 1 benchmarks/synth20-15-1-overlapped-96px-seed1.json ...

Arguments come in groups: a protocol label, a data seed, then one or more result files of that run
(methods from later files are added to the earlier ones'; a method in two files is an error). A file
argument ``path.json#old->new`` (one or more ``#old->new``) renames a method of that file (a method
whose defaults changed after the run: its row keeps saying what ran). Per protocol it prints a
markdown table: old / new / all-mIoU of each method per seed, the mean all-mIoU over the seeds and
its ratio to joint training's mean, and the same ratio for the new classes. The
figure shows the all-mIoU ratios as bars.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

JOINT = "joint"


def read_groups(argv: list[str]) -> dict[str, dict[int, dict[str, dict]]]:
    """``[label, seed, file, file, label, seed, file, ...]`` -> {label: {seed: {method: result}}}."""
    groups: dict[str, dict[int, dict[str, dict]]] = defaultdict(dict)
    i = 0
    while i < len(argv):
        label, seed = argv[i], int(argv[i + 1])
        i += 2
        methods: dict[str, dict] = {}
        while i < len(argv) and ".json" in argv[i]:
            path, *renames = argv[i].split("#")
            renamed = dict(rename.split("->", 1) for rename in renames)
            for name, result in json.loads(Path(path).read_text())["methods"].items():
                name = renamed.get(name, name)
                if name in methods:
                    raise ValueError(f"{name} appears twice for {label} seed {seed}")
                methods[name] = result
            i += 1
        groups[label][seed] = methods
    return groups


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(label: str, runs: dict[int, dict[str, dict]]) -> tuple[str, dict[str, float]]:
    """Markdown table of one protocol; returns it and each method's mean all-mIoU / joint's."""
    seeds = sorted(runs)
    names = [name for name in runs[seeds[0]] if all(name in runs[s] for s in seeds)]
    names += sorted({n for s in seeds for n in runs[s]} - set(names))

    def mean(name: str, key: str) -> float:
        return statistics.mean(runs[s][name]["final"][key] for s in seeds if name in runs[s])

    joint, joint_new = mean(JOINT, "miou_all"), mean(JOINT, "miou_new")
    means = {name: mean(name, "miou_all") for name in names}
    header = "| method | " + " | ".join(f"seed {s}: old / new / all" for s in seeds)
    header += " | mean all | mean all / joint's | mean new / joint's |"
    lines = [f"**{label}**", "", header, "|---" * (len(seeds) + 4) + "|"]
    for name in sorted(names, key=lambda n: (n != JOINT, -means[n])):
        cells = []
        for s in seeds:
            final = runs[s].get(name, {}).get("final")
            cells.append(
                " / ".join(percent(final[k]) for k in ("miou_old", "miou_new", "miou_all")) if final else "-"
            )
        complete = "" if all(name in runs[s] for s in seeds) else " (not every seed)"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {percent(means[name])}{complete} | {means[name] / joint:.3f}"
            + f" | {mean(name, 'miou_new') / joint_new:.2f} |"
        )
    return "\n".join(lines), {name: means[name] / joint for name in names}


def figure(ratios: dict[str, dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for r in ratios.values() for m in r if m != JOINT})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(ratios)
    for i, (label, by_method) in enumerate(ratios.items()):
        xs = [j + i * width for j in range(len(methods))]
        ax.bar(xs, [by_method.get(m, 0) for m in methods], width, label=label)
    ax.axhline(0.9, linestyle="--", color="grey", label="goal: 0.90 of joint")
    ax.set_xticks([j + width * (len(ratios) - 1) / 2 for j in range(len(methods))])
    ax.set_xticklabels(methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("all-mIoU / joint's (mean over data seeds)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("groups", nargs="+", help="LABEL SEED FILE [FILE ...] [LABEL SEED FILE ...]")
    args = parser.parse_args()
    ratios = {}
    for label, runs in read_groups(args.groups).items():
        text, ratios[label] = table(label, runs)
        print(text, end="\n\n")
    if args.figure is not None:
        figure(ratios, args.figure)


if __name__ == "__main__":
    main()
