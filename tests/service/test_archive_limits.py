"""receive_dataset against archives built to exhaust memory while they are listed, or to flood the error.

tarfile reads a GNU long-name or PAX header whole, follows chains of such headers recursively and keeps
every PAX global header for the rest of the archive; zipfile reads the whole central directory and builds
an object per entry. Each test builds such an archive (raw headers where tarfile and zipfile would not
write them), runs ``receive_dataset`` under ``tracemalloc`` and checks that the refusal is a 400 that came
before the memory was spent (the peak of Python allocations during the call) and that the error text, which
the API sends back, stays short.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from service.archive import SHOWN_NAME_CHARS, UploadError, receive_dataset, remove_staged
from service.settings import Settings
from training.data import write_synthetic_dataset

KNOWN = ["background"]
PEAK_BOUND_BYTES = 4 << 20  # what a refusal may allocate (the zip scan reads through a 1 MiB buffer)
ERROR_BOUND_CHARS = 1000  # the whole error text: the entry, cut, and the message
ZIP_FMT: Any = zipfile  # zipfile's record layouts (struct formats): private, so typeshed omits them


@pytest.fixture
def staging(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "staging"
    yield root
    assert not root.exists() or not any(root.iterdir()), "a refused upload left files behind"


def refused_with_peak(archive: Path, staging: Path, settings: Settings) -> tuple[UploadError, int]:
    """Runs receive_dataset, which must refuse; returns the error and the peak bytes Python allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(UploadError) as caught:
            receive_dataset(archive, archive.name, staging, settings, KNOWN)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(str(caught.value)) < ERROR_BOUND_CHARS, f"error text of {len(str(caught.value))} characters"
    return caught.value, peak


def header(name: str, kind: bytes, size: int, tar_format: Literal[0, 1, 2] = tarfile.USTAR_FORMAT) -> bytes:
    """One 512-byte tar header, written as is (no long-name or PAX header added)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tar_format)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def write_tar_gz(path: Path, blocks: Callable[[], Iterator[bytes]]) -> Path:
    """Streams ``blocks`` and the two zero blocks that end a tar into a gzip file (fast level)."""
    with gzip.open(path, "wb", compresslevel=1) as file:
        for block in blocks():
            file.write(block)
        file.write(bytes(2 * tarfile.BLOCKSIZE))
    return path


def small_file(name: str) -> Iterator[bytes]:
    yield header(name, tarfile.REGTYPE, 1)
    yield padded(b"x")


# ---- tar ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_tar_long_name_header_is_refused_before_it_is_read(
    tmp_path: Path, staging: Path, settings: Settings, tar_format: int
) -> None:
    """One member with a 16 MiB name: a GNU long-name ('L') or a PAX ('x') header of 16 MiB."""
    name = "a" * (16 << 20)
    with tarfile.open(tmp_path / "long.tar.gz", "w:gz", format=tar_format, compresslevel=1) as archive:
        archive.addfile(tarfile.TarInfo(name), io.BytesIO())
    error, peak = refused_with_peak(tmp_path / "long.tar.gz", staging, settings)
    assert error.status_code == 400 and error.entry == "long.tar.gz"
    assert "header of 1677" in error.message and "65536" in error.message, error.message
    assert peak < PEAK_BOUND_BYTES, f"{peak} bytes allocated"


def test_tar_chain_of_extension_headers_is_refused(tmp_path: Path, staging: Path, settings: Settings) -> None:
    """5000 empty PAX headers before one member: tarfile follows them recursively (RecursionError)."""

    def blocks() -> Iterator[bytes]:
        empty_pax = header("pax", tarfile.XHDTYPE, 0)
        for _ in range(5000):
            yield empty_pax
        yield from small_file("data/x.txt")

    error, _ = refused_with_peak(write_tar_gz(tmp_path / "chain.tgz", blocks), staging, settings)
    assert error.status_code == 400 and error.entry == "chain.tgz" and "extension headers" in error.message


def test_tar_global_headers_are_bounded_over_the_archive(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """60 members each after a 20 KB PAX global header of new keywords: tarfile keeps them all and copies
    the whole set into every later member."""

    def blocks() -> Iterator[bytes]:
        for member in range(60):
            records = {f"k{member}.{key}": "v" for key in range(2000)}
            yield tarfile.TarInfo.create_pax_global_header(records)
            yield from small_file(f"data/{member}.txt")

    error, peak = refused_with_peak(write_tar_gz(tmp_path / "global.tgz", blocks), staging, settings)
    assert error.status_code == 400 and error.entry == "global.tgz" and "global" in error.message
    assert peak < PEAK_BOUND_BYTES, f"{peak} bytes allocated"


def test_tar_global_header_under_the_bound_is_not_kept_per_member(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """One 1000-byte global header of 100 keywords, then 2001 members: tarfile gives each member a copy."""

    def blocks() -> Iterator[bytes]:
        yield tarfile.TarInfo.create_pax_global_header({f"k{key:02d}": "v" for key in range(100)})
        for member in range(2001):
            yield from small_file(f"data/{member}.txt")

    limits = settings.model_copy(update={"max_archive_entries": 2000})
    error, peak = refused_with_peak(write_tar_gz(tmp_path / "copies.tgz", blocks), staging, limits)
    assert error.status_code == 400 and "more than 2000 members" in error.message
    assert peak < PEAK_BOUND_BYTES, f"{peak} bytes allocated"


def test_tar_extension_headers_are_bounded_over_the_archive(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """Members each after a 60 KB PAX header of 10 000 six-byte records: each is parsed record by record."""
    records = b"6 ab=\n" * 10_000

    def blocks() -> Iterator[bytes]:
        for member in range(99):
            yield header("pax", tarfile.XHDTYPE, len(records))
            yield padded(records)
            yield from small_file(f"data/{member}.txt")

    limits = settings.model_copy(update={"max_archive_entries": 1000})  # 250 KiB of extension headers
    error, _ = refused_with_peak(write_tar_gz(tmp_path / "records.tgz", blocks), staging, limits)
    assert error.status_code == 400 and error.entry == "records.tgz"
    assert "the archive's long-name and PAX headers would take 300000 bytes" in error.message, error.message


def test_tar_gnu_sparse_map_is_refused_before_it_is_read(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """A PAX header announcing GNU sparse format 1.0, whose map (read line by line) never ends."""

    def blocks() -> Iterator[bytes]:
        records = b"".join(_pax_record(key, value) for key, value in SPARSE_1_0.items())
        yield header("pax", tarfile.XHDTYPE, len(records))
        yield padded(records)
        sparse_map = padded(b"99999999\n" + b"1\n" * (4 << 20))
        yield header("data/x.png", tarfile.REGTYPE, len(sparse_map))
        yield sparse_map

    error, peak = refused_with_peak(write_tar_gz(tmp_path / "sparse.tgz", blocks), staging, settings)
    assert error.status_code == 400 and "sparse" in error.message
    assert peak < PEAK_BOUND_BYTES, f"{peak} bytes allocated"


SPARSE_1_0 = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "100"}


def _pax_record(keyword: str, value: str) -> bytes:
    """``"<length> <keyword>=<value>\\n"``, the length counting itself."""
    body = f" {keyword}={value}\n".encode()
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def test_truncated_old_gnu_sparse_header_is_a_400(tmp_path: Path, staging: Path, settings: Settings) -> None:
    """An old-style GNU sparse member ('S') that says more sparse blocks follow, at the end of the data."""
    block = bytearray(header("data/x.png", tarfile.GNUTYPE_SPARSE, 0, tarfile.GNU_FORMAT))
    block[482] = 1  # isextended: an extension block follows
    block[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    block[148:156] = b"%06o\0 " % sum(block)
    path = tmp_path / "sparse.tar"
    path.write_bytes(bytes(block))
    error, _ = refused_with_peak(path, staging, settings)
    assert error.status_code == 400 and error.entry == "data/x.png" and "sparse" in error.message


# ---- zip ---------------------------------------------------------------------------------------------------


def zip_of_empty_files(count: int, declared: int | None = None, extra: bytes = b"") -> bytes:
    """A stored zip of ``count`` empty files, written directly (zipfile would take seconds for 400 000).

    ``declared`` is the entry count written in the end records (the real count by default); past 65535
    entries they are ZIP64 records, as zip tools write them. ``extra`` goes into every central header.
    """
    local, central = [], []
    offset = 0
    for index in range(count):
        name = b"d/%07d" % index
        entry_local = struct.pack(ZIP_FMT.structFileHeader, b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 0,
                                  len(name), 0) + name  # fmt: skip
        entry_central = struct.pack(
            ZIP_FMT.structCentralDir, b"PK\x01\x02", 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0,
            len(name), len(extra), 0, 0, 0, 0, offset,
        ) + name + extra  # fmt: skip
        local.append(entry_local)
        central.append(entry_central)
        offset += len(entry_local)
    directory = b"".join(central)
    declared = count if declared is None else declared
    end = b""
    if declared > 0xFFFF:
        record_offset = offset + len(directory)
        end = struct.pack(
            ZIP_FMT.structEndArchive64, b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared,
            len(directory), offset,
        ) + struct.pack(ZIP_FMT.structEndArchive64Locator, b"PK\x06\x07", 0, record_offset, 1)  # fmt: skip
    short_count = min(declared, 0xFFFF)
    end += struct.pack(
        ZIP_FMT.structEndArchive, b"PK\x05\x06", 0, 0, short_count, short_count, len(directory), offset, 0
    )
    return b"".join(local) + directory + end


def test_zip_of_400000_entries_is_refused_before_zipfile_lists_it(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """The issue's archive: 400 000 empty entries (ZIP64 end records) against the default 100 000."""
    archive = tmp_path / "many.zip"
    archive.write_bytes(zip_of_empty_files(400_000))
    assert zipfile.is_zipfile(archive) and settings.max_archive_entries == 100_000
    error, peak = refused_with_peak(archive, staging, settings)
    assert error.status_code == 400 and error.entry == "many.zip"
    assert "more than 100000 members" in error.message
    assert peak < PEAK_BOUND_BYTES, f"{peak} bytes allocated"


def test_zip_whose_end_record_understates_its_entries(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """ZipFile reads every header in the directory whatever count the end record gives; so does the check."""
    archive = tmp_path / "liar.zip"
    archive.write_bytes(zip_of_empty_files(20_000, declared=1))
    limits = settings.model_copy(update={"max_archive_entries": 1000})
    error, peak = refused_with_peak(archive, staging, limits)
    assert error.status_code == 400 and "more than 1000 members" in error.message
    assert peak < PEAK_BOUND_BYTES, f"{peak} bytes allocated"


def test_zip_with_an_implausibly_large_central_directory(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """Few entries, each with 60 KB of extra field: ZipFile reads and keeps the whole directory."""
    archive = tmp_path / "fat.zip"
    archive.write_bytes(
        zip_of_empty_files(200, extra=b"\xfe\xca" + struct.pack("<H", 60_000) + bytes(60_000))
    )
    limits = settings.model_copy(update={"max_archive_entries": 1000})
    error, peak = refused_with_peak(archive, staging, limits)
    assert error.status_code == 400 and error.entry == "fat.zip" and "central directory" in error.message
    assert peak < PEAK_BOUND_BYTES, f"{peak} bytes allocated"


# ---- names in errors ---------------------------------------------------------------------------------------


def _tar_with(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    path = tmp_path / "up.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data))
    return path


def _cut(name: str) -> str:
    return f"{name[:SHOWN_NAME_CHARS]}... ({len(name) - SHOWN_NAME_CHARS} more characters)"


LONG = "x" * 20_000


@pytest.mark.parametrize(
    ("name", "entry", "problem"),
    [
        (f"../{LONG}", _cut(f"../{LONG}"), "zip slip"),
        (f"a\x01{LONG}", _cut(repr(f"a\x01{LONG}")), "control character"),
        ("/".join(["a" * 200] * 20), _cut("/".join(["a" * 200] * 20)), "path longer than 1024 bytes"),
    ],
    ids=["zip-slip", "control-character", "long-path"],
)
def test_names_in_errors_are_cut(
    tmp_path: Path, staging: Path, settings: Settings, name: str, entry: str, problem: str
) -> None:
    """A 20 000 character name (in a PAX header, under the header bound) comes back cut to 200."""
    info = tarfile.TarInfo(name)
    info.size = 1
    error, _ = refused_with_peak(_tar_with(tmp_path, (info, b"x")), staging, settings)
    assert error.status_code == 400 and error.entry == entry and problem in error.message


def test_link_target_in_error_is_cut(tmp_path: Path, staging: Path, settings: Settings) -> None:
    info = tarfile.TarInfo("data/link.png")
    info.type, info.linkname = tarfile.SYMTYPE, LONG
    error, _ = refused_with_peak(_tar_with(tmp_path, (info, b"")), staging, settings)
    assert error.status_code == 400 and error.entry == "data/link.png"
    assert f"link to {_cut(repr(LONG))}" in error.message


def test_long_zip_path_is_a_400_not_a_crash(tmp_path: Path, staging: Path, settings: Settings) -> None:
    """Components under 255 bytes, 5000 bytes in all: writing it fails with ENAMETOOLONG."""
    name = "/".join(["a" * 249] * 20) + "/x.txt"
    with zipfile.ZipFile(tmp_path / "deep.zip", "w") as archive:
        archive.writestr("classes.txt", "background\nx\n")
        archive.writestr(name, "x")
    error, _ = refused_with_peak(tmp_path / "deep.zip", staging, settings)
    assert (
        error.status_code == 400 and error.entry == _cut(name) and "longer than 1024 bytes" in error.message
    )


def test_dataset_problem_quoting_a_long_class_name_is_cut(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """A class name of 100 000 characters without pixels: the 422 quotes it; its start and advice stay."""
    dataset = write_synthetic_dataset(tmp_path / "ds", 2, 4, 2, 32, seed=3)
    classes = dataset / "classes.txt"
    classes.write_text(classes.read_text() + "u" * 100_000 + "\n")
    path = tmp_path / "classes.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(dataset.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(dataset).as_posix())
    error, _ = refused_with_peak(path, staging, settings)
    assert error.status_code == 422 and error.entry == "classes.txt"
    assert error.message.startswith("line 4: new class 'uuu") and "characters left out" in error.message
    assert error.message.endswith("renumber the masks"), error.message[-100:]


def test_dataset_with_long_names_under_the_bounds_is_staged(
    tmp_path: Path, staging: Path, settings: Settings
) -> None:
    """PAX headers of long paths and a global header (as ``git archive`` writes) still pass."""
    dataset = write_synthetic_dataset(tmp_path / "ds", 2, 4, 2, 32, seed=3)
    top = "long folder name " * 14  # 238 characters: PAX path headers
    path = tmp_path / "git.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": "0" * 40}) as archive:
        for file in sorted(dataset.rglob("*")):
            if file.is_file():
                archive.add(file, f"{top}/{file.relative_to(dataset).as_posix()}")
    staged = receive_dataset(path, path.name, staging, settings, KNOWN)
    assert (staged.train_images, staged.val_images) == (4, 2)
    remove_staged(staged.path)


# ---- the issue's archives, measured as the API process would see them -------------------------------------

MEASURE = """
import json, sys, time
from pathlib import Path
from service.archive import UploadError, receive_dataset
from service.settings import Settings

def peak_kib():
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])

archive, staging = Path(sys.argv[1]), Path(sys.argv[2])
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
before = peak_kib()
start = time.perf_counter()
try:
    receive_dataset(archive, archive.name, staging, Settings(_env_file=None), ["background"])
    error = None
except UploadError as refusal:
    error = refusal
seconds = time.perf_counter() - start
print(json.dumps({"rss_growth_mib": (peak_kib() - before) / 1024, "seconds": seconds,
                  "status": error and error.status_code, "error_chars": error and len(str(error))}))
"""


def write_long_name_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(tarfile.TarInfo("a" * 60_000_000), io.BytesIO())
    return path


def write_many_entries_zip(path: Path) -> Path:
    path.write_bytes(zip_of_empty_files(400_000))
    return path


@pytest.mark.badinput
@pytest.mark.parametrize(
    ("name", "build"),
    [("issue.tar.gz", write_long_name_tar), ("issue.zip", write_many_entries_zip)],
    ids=["tar.gz-60MB-name", "zip-400000-entries"],
)
def test_issue_archives_peak_rss(tmp_path: Path, name: str, build: Callable[[Path], Path]) -> None:
    """The issue's two archives against the default limits, in a fresh process: its peak RSS growth."""
    archive = build(tmp_path / name)
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(archive), str(tmp_path / "staging")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    figures = json.loads(run.stdout)
    print(f"{archive.name} ({archive.stat().st_size} bytes): {figures}")
    assert figures["status"] == 400 and figures["error_chars"] < ERROR_BOUND_CHARS
    assert figures["rss_growth_mib"] < 16, figures
