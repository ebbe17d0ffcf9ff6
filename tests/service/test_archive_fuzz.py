"""Hypothesis against the upload validator (``service.archive.receive_dataset``): random zip and tar archives.

Archives are built from a valid two-image dataset, mutated and mixed with hostile members: names with
``..`` and absolute paths aimed inside the sandbox, backslashes, NUL and control characters, long and
unicode names, paths past 1024 bytes, symbolic and hard links, devices and FIFOs, duplicates,
incompressible padding (past the upload limit), random and truncated image bytes, masks of random sizes and
labels, random class lists, truncated or random archive bytes; tars with long names in PAX or GNU headers.
The property: ``receive_dataset`` either returns a :class:`StagedDataset` inside the staging root, or
raises an :class:`UploadError` with a 4xx status and a message of bounded length; never another exception;
nothing is written outside the staging root, and nothing is left in it after a refusal.

The CI run takes ``ci`` (a modest number of examples); ``INCSEG_FUZZ_PROFILE=thorough`` runs many more
(README, "Set up and run").
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from service.archive import StagedDataset, UploadError, receive_dataset
from service.settings import Settings

pytestmark = [pytest.mark.badinput, pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile(os.environ.get("INCSEG_FUZZ_PROFILE", "ci"))

# small limits, so that random archives reach every limit
LIMITS = Settings(
    _env_file=None,
    max_upload_bytes=64 << 10,
    max_archive_entries=16,
    max_uncompressed_bytes=512 << 10,
    max_compression_ratio=50.0,
    max_image_pixels=96 * 96,
)
ERROR_BOUND_CHARS = 1500  # names echoed are cut to 200 characters, a dataset problem to 600
STAGED_DEPTH = 3  # SANDBOX/data/staging/upload-*/: this many ".." from an extracted member reach SANDBOX


@dataclass(frozen=True)
class Member:
    """One archive member: ``kind`` is file, dir, symlink, hardlink, fifo or device."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """A PNG or JPEG of random size and pixels, or bytes that are not quite one."""
    height, width = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    pixels = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (height, width, 3), np.uint8)
    encoded = draw(st.sampled_from([_png, _jpeg]))(pixels)
    return draw(
        st.sampled_from([encoded, encoded[: max(1, len(encoded) // 2)], b"", encoded[:8] + b"\0" * 64])
        | st.binary(max_size=512)
    )


@st.composite
def masks(draw: st.DrawFn) -> bytes:
    """A single-channel PNG of random size with labels from a small set (with 255) or any value."""
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    values = draw(st.lists(st.sampled_from([0, 1, 2, 3, 200, 255]), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    pixels = rng.choice(np.array(values, np.uint8), (height, width))
    return draw(st.sampled_from([_png(pixels, "L"), _png(pixels, "L")[:40]]) | st.binary(max_size=256))


SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # the Unicode category no file name can encode
NAME_PART = st.sampled_from(
    [
        "images",
        "masks",
        "splits",
        "classes.txt",
        "a.png",
        "b.png",
        "train.txt",
        "__MACOSX",
        "._a.png",
        ".",
        "",
    ]
) | st.text(st.characters(exclude_categories=SURROGATES), min_size=1, max_size=12)


@st.composite
def hostile_names(draw: st.DrawFn, sandbox: str) -> str:
    """A member name meant to escape, confuse or overflow; escapes aim inside ``sandbox``."""
    parts = draw(st.lists(NAME_PART, min_size=1, max_size=4))
    return draw(
        st.sampled_from(
            [
                "/".join([".."] * draw(st.integers(1, STAGED_DEPTH)) + ["escaped.txt"]),
                "/".join(["images", *[".."] * draw(st.integers(1, STAGED_DEPTH + 1)), "escaped.png"]),
                f"{sandbox}/absolute.txt",
                f"C:/{parts[-1]}",
                "images\\a.png",
                "masks/a\0.png",
                "images/\x1bx.png",
                "x" * draw(st.integers(200, 300)),
                "/".join(["d" * 250] * draw(st.integers(4, 24))),  # past 1024 bytes, past PATH_MAX
                "/".join(parts),
                "/".join(["top", *parts]),
            ]
        )
    )


@st.composite
def hostile_members(draw: st.DrawFn, sandbox: str) -> Member:
    name = draw(hostile_names(sandbox))
    kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo", "device"]))
    link = draw(st.sampled_from([f"{sandbox}/linked", "../../../linked", "classes.txt", "/etc/passwd"]))
    incompressible = st.integers(0, 100_000).map(lambda size: np.random.default_rng(size).bytes(size))
    return Member(name, kind, draw(st.binary(max_size=64) | incompressible), link)


@st.composite
def datasets(draw: st.DrawFn, sandbox: str) -> list[Member]:
    """A valid two-image dataset (new class ``cat``), as is or with random mutations and hostile members."""
    rng = np.random.default_rng(0)
    good_image = _png(rng.integers(0, 256, (32, 32, 3), np.uint8))
    good_mask = _png(np.where(np.arange(32 * 32).reshape(32, 32) % 3 == 0, 1, 0).astype(np.uint8), "L")
    mutate = draw(st.booleans())
    classes = "background\ncat\n"
    if mutate:
        classes = draw(
            st.sampled_from([classes, "background\ncat\ndog\n", "background\n", "", "\0\n\n"])
            | st.text(max_size=40)
        )
    members = [Member("classes.txt", data=classes.encode())]
    for stem in ("a", "b"):
        image, mask = (draw(st.just(good_image) | images()), draw(st.just(good_mask) | masks()))
        members.append(Member(f"images/{stem}.png", data=image if mutate else good_image))
        members.append(Member(f"masks/{stem}.png", data=mask if mutate else good_mask))
    if draw(st.booleans()):
        members.append(Member("splits/train.txt", data=draw(st.sampled_from([b"a\nb\n", b"a\n", b"zz\n"]))))
    if mutate:
        members += draw(st.lists(hostile_members(sandbox), min_size=1, max_size=3))
    members = draw(st.permutations(members))
    top = draw(st.sampled_from([None, "dataset", "../up"] if mutate else [None, "dataset"]))
    if top is not None:
        members = [Member(f"{top}/{m.name}", m.kind, m.data, m.link) for m in members]
    return members


def _zip_bytes(members: list[Member], method: int) -> bytes:
    buffer = io.BytesIO()
    modes = {"symlink": stat.S_IFLNK | 0o777, "fifo": stat.S_IFIFO | 0o644, "device": stat.S_IFCHR | 0o644}
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for member in members:
            name = member.name + ("/" if member.kind == "dir" and not member.name.endswith("/") else "")
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            if member.kind in modes:
                info.external_attr = modes[member.kind] << 16
            data = member.link.encode() if member.kind in ("symlink", "hardlink") else member.data
            archive.writestr(info, b"" if member.kind == "dir" else data, method)
    return buffer.getvalue()


# archive kind -> tarfile's write mode
TAR_WRITE_MODES: dict[str, Literal["w:", "w:gz", "w:xz"]] = {"tar": "w:", "tar.gz": "w:gz", "tar.xz": "w:xz"}


def _tar_bytes(members: list[Member], mode: Literal["w:", "w:gz", "w:xz"], tar_format: int) -> bytes:
    buffer = io.BytesIO()
    types = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "fifo": tarfile.FIFOTYPE,
        "device": tarfile.CHRTYPE,
    }
    with tarfile.open(fileobj=buffer, mode=mode, format=tar_format) as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = types[member.kind]
            info.linkname = member.link
            data = member.data if member.kind == "file" else b""
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@st.composite
def archives(draw: st.DrawFn, sandbox: str) -> tuple[str, bytes]:
    """(upload file name, archive bytes): zip, tar, tar.gz or tar.xz, maybe truncated, or random bytes."""
    members = draw(datasets(sandbox))
    kind = draw(st.sampled_from(["zip-deflate", "zip-stored", "tar", "tar.gz", "tar.xz", "random"]))
    try:
        if kind.startswith("zip"):
            data = _zip_bytes(members, zipfile.ZIP_DEFLATED if kind == "zip-deflate" else zipfile.ZIP_STORED)
        elif kind == "random":
            data = draw(st.binary(max_size=2048))
        else:
            tar_format = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))  # long names: x or L
            data = _tar_bytes(members, TAR_WRITE_MODES[kind], tar_format)
    except (ValueError, UnicodeError, tarfile.TarError):
        reject()  # a name the writer cannot encode: no such archive exists
    event(f"archive: {kind}")
    if draw(st.integers(1, 10)) == 10:
        event("archive truncated")
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    suffix = {"zip-deflate": ".zip", "zip-stored": ".zip", "random": draw(st.sampled_from([".zip", ".bin"]))}
    return f"upload{suffix.get(kind, '.' + kind)}", data


def _tree(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*")}


# the sandbox's path goes into the absolute member names, so it must exist before the strategy draws
SANDBOX_PARENT = Path(tempfile.mkdtemp(prefix="incseg-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_sandbox_parent():
    yield
    shutil.rmtree(SANDBOX_PARENT, ignore_errors=True)


@PROFILE
@given(
    upload=archives(str(SANDBOX_PARENT / "sandbox")),
    known=st.sampled_from([["background"], ["background", "cat"]]),
)
def test_receive_dataset_refuses_cleanly_or_stages_inside_the_staging_root(
    upload: tuple[str, bytes], known: list[str]
) -> None:
    sandbox = SANDBOX_PARENT / "sandbox"
    shutil.rmtree(sandbox, ignore_errors=True)
    staging = sandbox / "data" / "staging"
    staging.mkdir(parents=True)
    filename, data = upload
    archive_path = sandbox / "upload" / filename
    archive_path.parent.mkdir()
    archive_path.write_bytes(data)
    before = _tree(SANDBOX_PARENT)
    try:
        staged = receive_dataset(archive_path, filename, staging, LIMITS, known)
    except UploadError as error:
        event(f"refused with {error.status_code}")
        assert error.status_code in (400, 413, 415, 422) and error.message, repr(error)
        assert len(str(error)) < ERROR_BOUND_CHARS, f"an error of {len(str(error))} characters"
        assert list(staging.iterdir()) == [], "a refused upload leaves nothing staged"
        assert _tree(SANDBOX_PARENT) == before, "nothing written outside the staging root"
        return
    event("staged")
    assert isinstance(staged, StagedDataset) and staged.path.parent == staging and staged.path.is_dir()
    assert staged.new_classes and staged.train_images >= 1
    outside = _tree(SANDBOX_PARENT) - before
    staged_part = staged.path.relative_to(SANDBOX_PARENT).as_posix()
    assert all(path == staged_part or path.startswith(staged_part + "/") for path in outside), outside
