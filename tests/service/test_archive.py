"""receive_dataset on real zip and tar archives: the happy paths, and every refusal with its status and entry.

Malicious archives are built here with zipfile and tarfile (and a byte patch where those refuse to write
the bad field). Every failure must leave the staging directory empty.
"""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.archive import StagedDataset, UploadError, receive_dataset, remove_staged
from service.settings import Settings
from training.data import read_source, write_synthetic_dataset

KNOWN = ["background"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes, 4 train + 2 val images of 32 px, in the project format."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("archive") / "ds", 2, 4, 2, 32, seed=1)


@pytest.fixture
def limits(settings: Settings) -> Settings:
    return settings


@pytest.fixture
def staging(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "staging"
    yield root
    # after every test, failure or not, only what a successful receive returned may remain
    assert not root.exists() or all(path.name.startswith("upload-") for path in root.iterdir())


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path.relative_to(folder).as_posix(), path


def make_zip(path: Path, folder: Path, top: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, file in _files(folder):
            archive.write(file, f"{top}/{name}" if top else name)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def make_tar(
    path: Path,
    folder: Path,
    top: str | None = None,
    members: Sequence[tuple[tarfile.TarInfo, bytes | None]] = (),
) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, file in _files(folder):
            archive.add(file, f"{top}/{name}" if top else name)
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def refused(
    archive: Path, staging: Path, settings: Settings, known: list[str] = KNOWN, filename: str | None = None
) -> UploadError:
    with pytest.raises(UploadError) as caught:
        receive_dataset(archive, filename or archive.name, staging, settings, known)
    assert not staging.exists() or not any(staging.iterdir()), "a failed upload left files behind"
    return caught.value


def assert_staged(staged: StagedDataset, staging: Path, source_folder: Path) -> None:
    assert staged.path.parent == staging and staged.path.name.startswith("upload-")
    assert staged.classes == (source_folder / "classes.txt").read_text().split()
    assert staged.new_classes == staged.classes[1:]
    assert (staged.train_images, staged.val_images) == (4, 2) and staged.supervision == "full"
    extracted = dict(_files(staged.path))
    assert extracted.keys() == dict(_files(source_folder)).keys()
    assert staged.bytes == sum(path.stat().st_size for path in extracted.values())
    assert read_source(staged.path).classes == tuple(staged.classes)
    remove_staged(staged.path)
    assert not staged.path.exists()


# ---- happy paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top", [None, "my dataset"])
@pytest.mark.parametrize(("suffix", "writer"), [(".zip", make_zip), (".tar.gz", make_tar)])
def test_dataset_at_root_or_in_one_top_folder(
    dataset: Path,
    tmp_path: Path,
    staging: Path,
    limits: Settings,
    suffix: str,
    writer: Callable,
    top: str | None,
) -> None:
    archive = writer(tmp_path / f"upload{suffix}", dataset, top)
    assert_staged(receive_dataset(archive, archive.name, staging, limits, KNOWN), staging, dataset)


def test_format_is_read_from_content_not_name(dataset: Path, tmp_path: Path, staging: Path, limits) -> None:
    archive = make_tar(tmp_path / "upload.bin", dataset)
    assert_staged(receive_dataset(archive, "dataset.zip", staging, limits, KNOWN), staging, dataset)


def test_macos_litter_is_not_extracted(dataset: Path, tmp_path: Path, staging: Path, limits) -> None:
    litter = {"__MACOSX/ds/._classes.txt": b"x", "ds/.DS_Store": b"x", "ds/images/._train_00000.png": b"x"}
    archive = make_zip(tmp_path / "mac.zip", dataset, "ds", litter)
    assert_staged(receive_dataset(archive, archive.name, staging, limits, KNOWN), staging, dataset)


def test_voc_layout(tmp_path: Path, staging: Path, limits: Settings) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, (stem, label) in enumerate([("a", 1), ("b", 15), ("c", 1), ("d", 15)]):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
            voc / "JPEGImages" / f"{stem}.jpg"
        )
        mask = np.zeros((24, 32), dtype=np.uint8)
        mask[4:20, 4 + index : 20 + index] = label
        mask[0] = 255
        Image.fromarray(mask).save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nc\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("d\n")
    archive = make_zip(tmp_path / "voc.zip", tmp_path / "VOCdevkit", "VOCdevkit")
    staged = receive_dataset(archive, archive.name, staging, limits, KNOWN)
    assert staged.new_classes == ["aeroplane", "person"] and len(staged.classes) == 21
    assert (staged.train_images, staged.val_images) == (3, 1)
    assert (staged.path / "VOC2012" / "JPEGImages" / "a.jpg").is_file()
    remove_staged(staged.path)


def test_remove_staged_refuses_other_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a staged dataset"):
        remove_staged(tmp_path)
    assert tmp_path.exists()


# ---- archive-level refusals ----------------------------------------------------------------------


def test_too_large_is_413(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    archive = make_zip(tmp_path / "big.zip", dataset)
    error = refused(archive, staging, limits.model_copy(update={"max_upload_bytes": 1000}))
    assert (
        error.status_code == 413 and error.entry == "big.zip" and "more than the 1000 allowed" in str(error)
    )


@pytest.mark.parametrize("content", [b"just some text\n", b"", b"\x1f\x8b\x08\x00garbage gzip"])
def test_not_an_archive_is_415(tmp_path: Path, staging: Path, limits: Settings, content: bytes) -> None:
    path = tmp_path / "upload"
    path.write_bytes(content)
    error = refused(path, staging, limits, filename="notes.txt")
    assert error.status_code == 415 and error.entry == "notes.txt"
    assert ".zip, .tar.gz" in error.message and "damaged" not in error.message


def test_truncated_zip_is_415_and_says_it_may_be_damaged(
    dataset: Path, tmp_path: Path, staging, limits
) -> None:
    archive = make_zip(tmp_path / "cut.zip", dataset)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    error = refused(archive, staging, limits)
    assert error.status_code == 415 and error.entry == "cut.zip" and "truncated" in error.message


def test_too_many_entries(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    archive = make_tar(tmp_path / "many.tar.gz", dataset)
    error = refused(archive, staging, limits.model_copy(update={"max_archive_entries": 5}))
    assert (
        error.status_code == 400 and error.entry == "many.tar.gz" and "more than 5 members" in error.message
    )


def test_total_uncompressed_size_limit(
    dataset: Path, tmp_path: Path, staging: Path, limits: Settings
) -> None:
    archive = make_zip(tmp_path / "up.zip", dataset)
    error = refused(archive, staging, limits.model_copy(update={"max_uncompressed_bytes": 2000}))
    assert error.status_code == 400 and error.entry in zipfile.ZipFile(archive).namelist()
    assert "more than the 2000 allowed in total" in error.message


def test_zip_bomb_member_ratio(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    archive = make_zip(tmp_path / "bomb.zip", dataset, extra={"images/zeros.png": bytes(8 << 20)})
    assert archive.stat().st_size < 100_000
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "images/zeros.png"
    assert "decompression bomb" in error.message and "8388608" in error.message


def test_tar_gz_bomb_archive_ratio(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    archive = make_tar(
        tmp_path / "bomb.tgz", dataset, members=[tar_member("images/zeros.png", data=bytes(8 << 20))]
    )
    assert archive.stat().st_size < 100_000
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "bomb.tgz" and "decompression bomb" in error.message


def test_member_larger_than_declared_stops_extraction(dataset: Path, tmp_path: Path, staging, limits) -> None:
    """A zip whose directory declares 1000 bytes for a member that inflates to 4 MiB (a lying header)."""
    archive = make_zip(tmp_path / "liar.zip", dataset, extra={"images/liar.png": bytes(4 << 20)})
    data = bytearray(archive.read_bytes())
    offsets = _central_offsets(data, b"images/liar.png")
    assert len(offsets) == 1
    data[offsets[0] + 24 : offsets[0] + 28] = (1000).to_bytes(4, "little")  # its uncompressed size
    archive.write_bytes(bytes(data))
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "images/liar.png" and "damaged" in error.message


def _central_offsets(data: bytearray, name: bytes) -> list[int]:
    """Offsets of the central directory headers of ``name``."""
    offsets, start = [], 0
    while (offset := data.find(b"PK\x01\x02", start)) >= 0:
        length = int.from_bytes(data[offset + 28 : offset + 30], "little")
        if data[offset + 46 : offset + 46 + length] == name:
            offsets.append(offset)
        start = offset + 4
    return offsets


def _unsafe_zip(path: Path, dataset: Path, info: zipfile.ZipInfo, data: bytes = b"x") -> Path:
    make_zip(path, dataset)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(info, data)
    return path


def _zip_link(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system, info.external_attr = 3, mode << 16
    return info


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../evil.txt", "zip slip"),
        ("images/../../evil.txt", "zip slip"),
        ("/abs/evil.txt", "absolute path"),
        ("C:/evil.txt", "absolute path"),
        ("images\\..\\evil.txt", "backslash"),
        ("images/bad\x01name.png", "control character"),
        ("images/new\nline.png", "control character"),
    ],
)
def test_unsafe_names_in_zip(
    dataset: Path, tmp_path: Path, staging, limits, name: str, expected: str
) -> None:
    error = refused(_unsafe_zip(tmp_path / "up.zip", dataset, zipfile.ZipInfo(name)), staging, limits)
    assert error.status_code == 400 and expected in error.message
    assert error.entry in (name, repr(name))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../evil.txt", "zip slip"),
        ("/abs/evil.txt", "absolute path"),
        ("images/a\x7fb.png", "control character"),
    ],
)
def test_unsafe_names_in_tar(
    dataset: Path, tmp_path: Path, staging, limits, name: str, expected: str
) -> None:
    archive = make_tar(tmp_path / "up.tar.gz", dataset, members=[tar_member(name, data=b"x")])
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and expected in error.message and error.entry in (name, repr(name))


def test_nul_in_zip_name(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    """zipfile writes no NUL in a name and cuts ZipInfo.filename at one: patch the bytes."""
    path = _unsafe_zip(tmp_path / "nul.zip", dataset, zipfile.ZipInfo("images/evilXname.png"))
    path.write_bytes(path.read_bytes().replace(b"images/evilXname.png", b"images/evil\x00name.png"))
    error = refused(path, staging, limits)
    assert error.status_code == 400 and error.entry == repr("images/evil\x00name.png")


@pytest.mark.parametrize(
    ("mode", "expected"), [(stat.S_IFLNK | 0o777, "symbolic link"), (stat.S_IFIFO | 0o644, "special entry")]
)
def test_zip_link_and_special_entries(dataset: Path, tmp_path: Path, staging, limits, mode, expected) -> None:
    archive = _unsafe_zip(tmp_path / "up.zip", dataset, _zip_link("images/link.png", mode), b"/etc/passwd")
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "images/link.png" and expected in error.message


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (tarfile.SYMTYPE, "link to '/etc/passwd'"),
        (tarfile.LNKTYPE, "link to '/etc/passwd'"),
        (tarfile.CHRTYPE, "special entry"),
        (tarfile.BLKTYPE, "special entry"),
        (tarfile.FIFOTYPE, "special entry"),
    ],
)
def test_tar_link_and_device_entries(dataset: Path, tmp_path: Path, staging, limits, kind, expected) -> None:
    member = tar_member("images/x.png", kind, linkname="/etc/passwd")
    error = refused(make_tar(tmp_path / "up.tgz", dataset, members=[member]), staging, limits)
    assert error.status_code == 400 and error.entry == "images/x.png" and expected in error.message


def test_duplicate_names(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = make_zip(tmp_path / "dup.zip", dataset, extra={"classes.txt": b"background\nx\n"})
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "classes.txt" and "duplicate" in error.message
    archive = make_tar(tmp_path / "dup.tgz", dataset, members=[tar_member("./classes.txt", data=b"bg\n")])
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "./classes.txt" and "duplicate" in error.message


def test_file_and_folder_of_one_name(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    archive = make_zip(tmp_path / "clash.zip", dataset, extra={"images/train_00000.png/x": b"x"})
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "images/train_00000.png/x"
    assert "'images/train_00000.png' is both a file and a folder" in error.message


def test_damaged_member(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    archive = make_zip(tmp_path / "crc.zip", dataset, extra={"notes.txt": b"hello " * 100})
    data = archive.read_bytes()
    stored = data.index(b"notes.txt") + len(b"notes.txt")  # the local header's name, then the deflated bytes
    archive.write_bytes(data[:stored] + bytes([data[stored] ^ 0xFF]) + data[stored + 1 :])
    error = refused(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "notes.txt" and "damaged" in error.message


# ---- dataset refusals (422) ----------------------------------------------------------------------


def _edited(dataset: Path, tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(dataset, copy)
    edit(copy)
    return copy


def _write_mask(path: Path, labels: np.ndarray) -> None:
    Image.fromarray(labels.astype(np.uint8)).save(path)


DATASET_PROBLEMS = {
    "undecodable image": (
        lambda d: (d / "images" / "train_00001.png").write_bytes(b"not a png"),
        "images/train_00001.png",
        "cannot read image",
    ),
    "truncated image": (
        lambda d: (d / "images" / "val_00000.png").write_bytes(
            (d / "images" / "val_00000.png").read_bytes()[:200]
        ),
        "images/val_00000.png",
        "corrupt or truncated",
    ),
    "mask of another size": (
        lambda d: _write_mask(d / "masks" / "val_00001.png", np.zeros((16, 32))),
        "masks/val_00001.png",
        "mask is 32x16 but image ds/images/val_00001.png is 32x32",
    ),
    "label not in classes.txt": (
        lambda d: _write_mask(d / "masks" / "train_00002.png", np.full((32, 32), 7)),
        "masks/train_00002.png",
        "label 7 is not a class index (0..2)",
    ),
    "missing classes.txt": (
        lambda d: (d / "classes.txt").unlink(),
        "ds",
        "unknown dataset layout; expected classes.txt",
    ),
    "missing mask": (
        lambda d: (d / "masks" / "train_00003.png").unlink(),
        "images/train_00003.png",
        "the mask ds/masks/train_00003.png is missing",
    ),
    "new class without pixels": (
        lambda d: (d / "classes.txt").write_text((d / "classes.txt").read_text() + "unicorn\n"),
        "classes.txt",
        "line 4: new class 'unicorn' (mask value 3) has no pixel in any mask",
    ),
}


@pytest.mark.parametrize("problem", DATASET_PROBLEMS)
def test_dataset_problems_are_422(dataset: Path, tmp_path: Path, staging, limits, problem: str) -> None:
    edit, entry, message = DATASET_PROBLEMS[problem]
    archive = make_tar(tmp_path / "up.tar.gz", _edited(dataset, tmp_path, edit), top="ds")
    error = refused(archive, staging, limits)
    assert error.status_code == 422
    assert error.entry == (f"ds/{entry}" if entry != "ds" else "ds")
    assert message in error.message, error.message
    assert str(staging) not in error.message and "upload-" not in error.message


def test_no_new_class_is_422(dataset: Path, tmp_path: Path, staging: Path, limits: Settings) -> None:
    classes = (dataset / "classes.txt").read_text().split()
    error = refused(make_zip(tmp_path / "up.zip", dataset), staging, limits, known=classes)
    assert error.status_code == 422 and error.entry == "classes.txt" and "already known" in error.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns above its own 89 Mpx
def test_image_pixel_bomb_is_refused_before_decoding(dataset: Path, tmp_path: Path, staging, limits) -> None:
    """A 12000 x 12000 PNG (144 Mpx, a few hundred KB) against the default 64 Mpx limit."""

    def plant(folder: Path) -> None:
        Image.new("1", (12000, 12000)).save(folder / "images" / "train_00000.png")

    archive = make_zip(tmp_path / "px.zip", _edited(dataset, tmp_path, plant))
    assert archive.stat().st_size < 2_000_000
    error = refused(archive, staging, limits)
    assert limits.max_image_pixels == 64_000_000
    assert error.status_code == 422 and error.entry == "images/train_00000.png"
    assert "12000x12000 pixels, more than the 64000000 allowed" in error.message


def test_empty_archive_is_422(tmp_path: Path, staging: Path, limits: Settings) -> None:
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("folder/", b"")
    error = refused(tmp_path / "empty.zip", staging, limits)
    assert error.status_code == 422 and error.entry == "empty.zip" and "holds no files" in error.message


@pytest.fixture(scope="module")
def weak_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes, the training split labelled by labels.csv (image-level labels), val by masks."""
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("weak") / "ds", 3, 6, 3, 32, seed=1, weak_train=True
    )


def test_weak_labels_archive_is_staged_as_weak(weak_dataset: Path, tmp_path: Path, staging, limits) -> None:
    names = (weak_dataset / "classes.txt").read_text().split()
    archive = make_zip(tmp_path / "weak.zip", weak_dataset, top="ds")
    staged = receive_dataset(archive, "weak.zip", staging, limits, names[:2])
    assert staged.supervision == "weak" and staged.new_classes == names[2:]
    assert (staged.path / "labels.csv").is_file() and not list((staged.path / "masks").glob("train_*"))


WEAK_PROBLEMS = {
    "unknown class": (
        lambda d: (d / "labels.csv").write_text(
            (d / "labels.csv").read_text().replace("\ntrain_00002,", "\ntrain_00002,unicorn;", 1)
        ),
        "labels.csv",
        "line 4: unknown class 'unicorn'",
    ),
    "row without an image": (
        lambda d: (d / "images" / "train_00005.png").unlink(),
        "labels.csv",
        "line 7: no image 'train_00005' in ds/images",
    ),
    "image without a row": (
        lambda d: (d / "labels.csv").write_text(
            "".join(
                line + "\n"
                for line in (d / "labels.csv").read_text().splitlines()
                if "train_00001" not in line
            )
        ),
        "labels.csv",
        "image 'train_00001' (ds/images/train_00001.png) has no row here and no mask",
    ),
    "bad header": (
        lambda d: (d / "labels.csv").write_text(
            "stem;labels\n" + (d / "labels.csv").read_text().split("\n", 1)[1]
        ),
        "labels.csv",
        "line 1: header is 'stem;labels'; the first line must be 'image,labels'",
    ),
}


@pytest.mark.parametrize("problem", WEAK_PROBLEMS)
def test_labels_csv_problems_are_422_naming_the_line(
    weak_dataset: Path, tmp_path: Path, staging, limits, problem: str
) -> None:
    edit, entry, message = WEAK_PROBLEMS[problem]
    archive = make_tar(tmp_path / "up.tar.gz", _edited(weak_dataset, tmp_path, edit), top="ds")
    names = (weak_dataset / "classes.txt").read_text().split()
    error = refused(archive, staging, limits, known=names[:2])
    assert (error.status_code, error.entry) == (422, f"ds/{entry}")
    assert message in error.message, error.message
    assert str(staging) not in error.message and "upload-" not in error.message


def test_weak_labels_as_the_first_task_are_refused(
    weak_dataset: Path, tmp_path: Path, staging, limits
) -> None:
    error = refused(make_zip(tmp_path / "weak.zip", weak_dataset, top="ds"), staging, limits, known=KNOWN)
    assert (error.status_code, error.entry) == (422, "ds/labels.csv")
    assert error.message.startswith("step 0 needs masks: 6 training image(s) have image-level labels only")
