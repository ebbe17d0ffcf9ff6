from __future__ import annotations

import pytest

from training.protocols import Protocol, Setting, train_indices, train_lut, val_indices, val_lut


@pytest.mark.parametrize(
    ("spec", "num_classes", "steps"),
    [
        ("15-1", 20, [list(range(1, 16)), [16], [17], [18], [19], [20]]),
        ("15-5s", 20, [list(range(1, 16)), [16], [17], [18], [19], [20]]),
        ("15-5", 20, [list(range(1, 16)), list(range(16, 21))]),
        ("10-2", 20, [list(range(1, 11)), [11, 12], [13, 14], [15, 16], [17, 18], [19, 20]]),
        ("4-3", 9, [[1, 2, 3, 4], [5, 6, 7], [8, 9]]),  # the last step takes what is left
        ("2-1-3", 8, [[1, 2], [3], [4, 5, 6]]),  # explicit sizes may leave classes unused
        ("[[3, 1], [2]]", 3, [[3, 1], [2]]),
    ],
)
def test_parse(spec: str, num_classes: int, steps: list[list[int]]) -> None:
    protocol = Protocol.parse(spec, num_classes)
    assert [list(s) for s in protocol.steps] == steps


def test_parse_named_ade_protocols() -> None:
    assert [len(s) for s in Protocol.parse("100-50", 150).steps] == [100, 50]
    assert [len(s) for s in Protocol.parse("100-10", 150).steps] == [100, 10, 10, 10, 10, 10]
    assert [len(s) for s in Protocol.parse("50-50", 150).steps] == [50, 50, 50]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("15-1", "more than the dataset"),
        ("3-0", ">= 1"),
        ("abc", "use A-B"),
        ("[[1], [1]]", "more than one step"),
        ("[[0, 1]]", "background"),
        ("[[1], [12]]", "above the dataset"),
        ("[[1], []]", "at least one class"),
        ("[1, 2", "JSON"),
    ],
)
def test_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Protocol.parse(spec, 10)


# Tiny fixture: 4 classes, protocol 2-1 -> steps {1,2}, {3}, {4}. Labels present per image:
LABELS = [
    frozenset({0, 1}),  # 0: base only
    frozenset({0, 3}),  # 1: step-1 class only
    frozenset({0, 1, 3}),  # 2: old + current (step 1)
    frozenset({0, 3, 4}),  # 3: current + future (step 1)
    frozenset({0, 4, 255}),  # 4: last step
    frozenset({0}),  # 5: background only: never used
]


@pytest.mark.parametrize(
    ("setting", "step", "expected"),
    [
        ("overlapped", 0, [0, 2]),
        ("disjoint", 0, [0]),  # images 2 has a future class (3)
        ("overlapped", 1, [1, 2, 3]),
        ("disjoint", 1, [1, 2]),  # image 3 holds the future class 4
        ("sequential", 1, [1, 2]),
        ("overlapped", 2, [3, 4]),
        ("disjoint", 2, [3, 4]),
    ],
)
def test_train_images_per_setting(setting: str, step: int, expected: list[int]) -> None:
    protocol = Protocol.parse("2-1", 4)
    assert train_indices(LABELS, protocol, step, Setting(setting)) == expected


def test_train_labels_per_setting() -> None:
    protocol = Protocol.parse("[[2, 1], [4], [3]]", 4)  # model order: 0, 2, 1, 4, 3
    overlapped = train_lut(protocol, 1, Setting.OVERLAPPED)
    assert overlapped[[0, 1, 2, 3, 4, 255]].tolist() == [0, 0, 0, 0, 3, 255]  # old and future -> bg
    sequential = train_lut(protocol, 1, Setting.SEQUENTIAL)
    assert sequential[[0, 1, 2, 3, 4, 255]].tolist() == [0, 2, 1, 0, 3, 255]  # old keep their model index
    assert train_lut(protocol, 0, Setting.DISJOINT)[[0, 1, 2, 3, 4]].tolist() == [0, 2, 1, 0, 0]


def test_validation_images_and_labels() -> None:
    protocol = Protocol.parse("2-1", 4)
    assert val_indices(LABELS, protocol, 0) == [0, 2]
    assert val_indices(LABELS, protocol, 2) == [0, 1, 2, 3, 4]
    assert val_lut(protocol, 1)[[0, 1, 2, 3, 4, 255]].tolist() == [0, 1, 2, 3, 0, 255]  # unseen -> bg
