"""The CLI end to end on tiny data: synth, step 0, step 1, and clear errors."""

from __future__ import annotations

from pathlib import Path

from incseg.cli import _options, build_parser, main
from training.model_dir import ModelBundle

TINY = [
    "--epochs",
    "1",
    "--size",
    "32",
    "--batch-size",
    "4",
    "--backbone",
    "resnet10",
    "--context-channels",
    "16",
    "--embed-channels",
    "16",
]


def test_synth_and_steps(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    assert (
        main(["synth", "--out", str(data), "--classes", "3", "--train", "8", "--val", "6", "--size", "32"])
        == 0
    )
    assert (data / "classes.txt").read_text().splitlines()[0] == "background"
    assert (
        main(
            [
                "step",
                "--base",
                "none",
                "--data",
                str(data),
                "--method",
                "ft",
                "--out",
                str(tmp_path / "v1"),
                *TINY,
            ]
        )
        == 0
    )
    assert ModelBundle.load(tmp_path / "v1").classes[0] == "background"
    code = main(
        ["step", "--base", str(tmp_path / "v1"), "--data", str(data), "--out", str(tmp_path / "v2"), *TINY]
    )
    assert code == 2 and "already known" in capsys.readouterr().err


def test_bad_data_dir_is_a_clear_error(tmp_path: Path, capsys) -> None:
    code = main(["step", "--base", "none", "--data", str(tmp_path), "--out", str(tmp_path / "m"), *TINY])
    assert code == 2 and "error" in capsys.readouterr().err


def test_lr_multipliers_reach_the_step_options() -> None:
    args = build_parser().parse_args(
        [
            "step",
            "--base",
            "none",
            "--data",
            "d",
            "--out",
            "o",
            "--lr-multipliers",
            '{"head": 1, "new_classes": 5}',
        ]
    )
    assert _options(args).lr_multipliers == {"head": 1.0, "new_classes": 5.0}
    assert (
        _options(
            build_parser().parse_args(["step", "--base", "none", "--data", "d", "--out", "o"])
        ).lr_multipliers
        is None
    )


def test_unknown_lr_multiplier_group_is_a_clear_error(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "step",
            "--base",
            "none",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
            "--lr-multipliers",
            '{"heads": 1}',
        ]
    )
    assert code == 2 and "unknown parameter groups ['heads']" in capsys.readouterr().err


def test_one_default_method_for_step_bench_demo_and_service(monkeypatch) -> None:
    """`incseg step`, `incseg bench`'s first method, the demo's incremental step and the service agree."""
    from incseg import cli
    from service.settings import Settings
    from training.method_spec import DEFAULT_METHOD, split_top_level

    parser = build_parser()
    step = parser.parse_args(["step", "--base", "none", "--data", "d", "--out", "o"])
    bench = parser.parse_args(["bench", "--data", "d"])
    assert step.method == DEFAULT_METHOD
    assert split_top_level(bench.methods, ",")[0] == DEFAULT_METHOD
    assert Settings(_env_file=None).default_method == DEFAULT_METHOD

    demo_methods: list[list[str]] = []
    monkeypatch.setattr(cli, "require_train_extra", lambda what: None)
    monkeypatch.setattr(cli, "write_synthetic_dataset", lambda *args: None)

    def record_bench(args: object, methods: list[str], out: object) -> dict:
        demo_methods.append(methods)
        return {}

    monkeypatch.setattr(cli, "_bench", record_bench)
    monkeypatch.setattr("training.bench.write_results", lambda results, out: None)
    monkeypatch.setattr("training.bench.plot_results", lambda results, out: None)
    assert main(["demo", "--out", "unused"]) == 0
    assert demo_methods == [["ft", DEFAULT_METHOD]]


def test_demo_url_takes_the_key_of_a_local_service(tmp_path: Path, monkeypatch) -> None:
    """`incseg demo --url` against `incseg api --host 0.0.0.0` on the same data dir needs no --api-key."""
    from service.api_key import key_file, load_or_create_key

    keys: list[str | None] = []
    monkeypatch.delenv("INCSEG_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # the default data directory, incseg-data, has no key file here
    monkeypatch.setattr("service.client.run_demo", lambda url, out, options, api_key: keys.append(api_key))
    key, _ = load_or_create_key(key_file(tmp_path / "data"))
    demo = ["demo", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    assert main([*demo, "--url", "http://127.0.0.1:8000"]) == 0
    assert main([*demo, "--url", "https://incseg.example.com"]) == 0  # never sent to another host
    assert main([*demo, "--url", "http://127.0.0.1:8000", "--api-key", "given"]) == 0
    assert main(["demo", "--out", str(tmp_path / "out"), "--url", "http://127.0.0.1:8000"]) == 0  # no file
    assert keys == [key, None, "given", None]


def test_weak_step_after_a_mask_step_and_a_weak_step_0_is_an_error(tmp_path: Path, capsys) -> None:
    masks, weak = tmp_path / "masks", tmp_path / "weak"
    synth = ["synth", "--train", "8", "--val", "4", "--size", "32"]
    assert main([*synth, "--out", str(masks), "--classes", "2"]) == 0
    assert main([*synth, "--out", str(weak), "--classes", "3", "--seed", "1", "--weak-train"]) == 0
    assert "8 train images with labels.csv" in capsys.readouterr().err.replace("\n", " ")
    code = main(["step", "--base", "none", "--data", str(weak), "--out", str(tmp_path / "v0"), *TINY])
    assert code == 2 and "step 0 needs masks" in capsys.readouterr().err
    assert not (tmp_path / "v0").exists()
    assert (
        main(
            [
                "step",
                "--base",
                "none",
                "--data",
                str(masks),
                "--method",
                "ft",
                "--out",
                str(tmp_path / "v1"),
                *TINY,
            ]
        )
        == 0
    )
    v1 = tmp_path / "v1"
    assert (
        main(
            [
                "step",
                "--base",
                str(v1),
                "--data",
                str(weak),
                "--method",
                "mib",
                "--out",
                str(tmp_path / "v2"),
                *TINY,
            ]
        )
        == 0
    )
    out = capsys.readouterr().err.replace("\n", " ")
    assert "step 1: + " in out and "images with image-level labels" in out and "mIoU old" in out
    bundle = ModelBundle.load(tmp_path / "v2")
    assert [record["supervision"] for record in bundle.history] == ["full", "weak"]
    assert bundle.classes == (weak / "classes.txt").read_text().split()
