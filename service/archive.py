"""Receiving a dataset upload: check the archive, extract it safely, validate the dataset, or refuse.

``receive_dataset`` accepts a zip or a tar (plain, gzip, bzip2 or xz; the format is read from the content,
not the file name) holding a dataset folder in any layout ``training.data.read_source`` reads (project
format, Pascal VOC, ADE20K), at the archive root or in one top folder.

Before the standard library lists an archive, what the listing would cost is bounded: a zip's central
directory is walked header by header (entry count, total size) before ``zipfile`` reads it, and a tar's
GNU long-name and PAX headers are refused above a size, and in chains above a length, before ``tarfile``
reads them. Every member is then checked from the archive's listing before anything is written: entry
count, name (no NUL or control character, no backslash, not absolute, no ``..`` component, not too long,
no duplicate, not both a file and a folder), type (regular files and folders only: symbolic and hard
links, devices, FIFOs and sparse files are refused), declared sizes (total under the limit; compression
ratio per zip member and over the whole archive). Then the members are extracted into a fresh directory
under the staging root, each copy stopping with an error as soon as it yields more bytes than its header
declared, and the dataset is validated with ``training.data.validate_dataset`` (every image decodable and
within the pixel limit, masks of their image's size, labels from the class list or 255, a new class with
training pixels or, for weak labels, a ``labels.csv`` row naming it; weak labels need a model to extend,
so a weak dataset as the first task is refused). On any failure everything written is deleted and an
:class:`UploadError` names the archive member concerned (a name cut to ``SHOWN_NAME_CHARS`` characters
wherever an error echoes one).

macOS archive litter (``__MACOSX/``, ``.DS_Store``, ``._*`` AppleDouble files) is checked like any member
but not extracted.

Status codes: 413 archive too large, 415 not a zip or tar, 400 unsafe or corrupt archive, 422 dataset
problem.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from training.data import DataError, read_source, validate_dataset
from training.data.sources import LABELS_FILE
from training.data.validate import Supervision

ACCEPTED_FORMATS = ".zip, .tar.gz / .tgz, .tar (also .tar.bz2, .tar.xz)"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
RATIO_FLOOR_BYTES = 1 << 20  # sizes at most this large pass whatever their compression ratio
COPY_CHUNK_BYTES = 1 << 20
MAX_NAME_PART_BYTES = 255  # longest file name component Linux file systems take
MAX_PATH_BYTES = 1024  # longest member path; with the staging root it stays under Linux's 4096 PATH_MAX
SHOWN_NAME_CHARS = 200  # names echoed in an error are cut to this many characters
SHOWN_PROBLEM_CHARS = 600  # a dataset problem's text (it quotes file and class names) is cut to this
# A zip's central directory may average this many bytes per allowed member: a header is 46 bytes plus the
# name, extra fields and comment, typically under 200 in all. zipfile reads the whole directory into memory.
CENTRAL_DIRECTORY_BYTES_PER_ENTRY = 512
# Bounds on tar extension headers (GNU long-name and long-link, PAX), which tarfile reads whole into memory
# and parses record by record (a few microseconds per record, records as short as 6 bytes):
# - before one member together: a path of MAX_PATH_BYTES plus times, owners and extended attributes fits
#   many times over;
MAX_TAR_MEMBER_EXTENSION_BYTES = 64 << 10
# - over the whole archive, on average per allowed member (tar tools write 0 to a few hundred bytes per
#   member; a tenth of the members at the entry limit may carry a path of MAX_PATH_BYTES);
TAR_EXTENSION_BYTES_PER_ENTRY = 256
# - the PAX global headers of the archive together: tarfile applies every global record to every later
#   member (``git archive`` writes one 52-byte record);
MAX_TAR_GLOBAL_EXTENSION_BYTES = 1 << 10
MAX_TAR_EXTENSION_HEADERS = 8  # - in a row before one member (tar tools write one to three: x, L, K)
TAR_EXTENSION_KINDS = {
    tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link header",
    tarfile.XHDTYPE: "PAX header",
    tarfile.SOLARIS_XHDTYPE: "PAX header",
    tarfile.XGLTYPE: "PAX global header",
}
STAGED_PREFIX = "upload-"
ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
# Errors raised while reading a damaged archive (gzip.BadGzipFile is an OSError).
READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, ValueError)
SPECIAL_ENTRY = "device, FIFO or other special entry; only files and folders are accepted"
SPARSE_ENTRY = "sparse file; archive it without --sparse"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class UploadError(Exception):
    """An upload refused, with the HTTP status the API answers and the archive member concerned.

    Args:
        status_code: 400 (unsafe or corrupt archive), 413 (too large), 415 (not an archive) or 422
            (dataset problem).
        entry: The archive member or dataset file concerned (the upload's file name for archive-wide
            problems), or None.
        message: What is wrong and what to fix.
    """

    def __init__(self, status_code: int, entry: str | None, message: str) -> None:
        entry = _shown(entry) if entry is not None else None
        super().__init__(status_code, entry, message)
        self.status_code = status_code
        self.entry = entry
        self.message = message

    def __str__(self) -> str:
        return f"{self.entry}: {self.message}" if self.entry else self.message


def _shown(text: str, limit: int = SHOWN_NAME_CHARS) -> str:
    """``text`` as an error echoes it: at most ``limit`` characters, then how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _cut_middle(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters in the middle, keeping its start and its advice at the end."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}... ({len(text) - 2 * half} characters left out) ...{text[-half:]}"


class UploadLimits(Protocol):
    """The settings ``receive_dataset`` reads (``service.settings.Settings`` has them)."""

    max_upload_bytes: int
    max_archive_entries: int
    max_uncompressed_bytes: int
    max_compression_ratio: float
    max_image_pixels: int


@dataclass
class StagedDataset:
    """A checked dataset extracted under the staging root, ready for ``training.step.run_step``.

    Attributes:
        path: The dataset folder (a fresh directory under the staging root; give it to
            :func:`remove_staged` when done).
        classes: The dataset's class names (index 0 background).
        new_classes: Classes the step will add to the model.
        train_images: Images in the training split.
        val_images: Images in the validation split.
        bytes: Bytes extracted.
        supervision: ``"weak"`` when training images have image-level labels (``labels.csv``) only.
    """

    path: Path
    classes: list[str]
    new_classes: list[str]
    train_images: int
    val_images: int
    bytes: int
    supervision: Supervision = "full"


@dataclass(frozen=True)
class _Entry:
    """One archive member as listed, before extraction."""

    name: str  # as stored in the archive
    parts: tuple[str, ...]  # normalised path components ("." and empty ones dropped)
    is_dir: bool
    size: int  # declared uncompressed bytes
    compressed: int | None  # stored bytes (zip); None where the whole stream is compressed (tar)
    handle: zipfile.ZipInfo | tarfile.TarInfo


class _Archive(Protocol):
    def entries(self) -> Iterator[_Entry]: ...
    def open(self, entry: _Entry) -> IO[bytes]: ...
    def close(self) -> None: ...


def receive_dataset(
    archive_path: Path, filename: str, staging_root: Path, settings: UploadLimits, known_classes: list[str]
) -> StagedDataset:
    """Checks an uploaded archive, extracts it into a fresh staging directory and validates the dataset.

    Args:
        archive_path: The uploaded file.
        filename: Its name as uploaded (named in archive-wide messages).
        staging_root: Directory under which a fresh ``upload-*`` directory is created.
        settings: The upload limits.
        known_classes: Classes of the active model (``["background"]`` when none).

    Returns:
        The staged dataset.

    Raises:
        UploadError: With status 413, 415, 400 or 422 and the member concerned; nothing written remains.
    """
    archive_bytes = archive_path.stat().st_size
    if archive_bytes > settings.max_upload_bytes:
        raise UploadError(
            413,
            filename,
            f"the archive has {archive_bytes} bytes, more than the {settings.max_upload_bytes} allowed; "
            "split the dataset into several tasks or downscale the images",
        )
    archive = _open_archive(archive_path, filename, settings)
    try:
        entries, top = _list_entries(archive, filename, archive_bytes, settings)
        staging_root.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=STAGED_PREFIX, dir=staging_root))
        try:
            written = _extract(archive, entries, staged, top)
            return _validate(staged, top, filename, written, settings, known_classes)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    finally:
        archive.close()


def remove_staged(path: Path) -> None:
    """Deletes a staged dataset (no error when it is already gone).

    Args:
        path: ``StagedDataset.path``.

    Raises:
        ValueError: When ``path`` is not a directory ``receive_dataset`` created (a guard against
            deleting anything else).
    """
    path = Path(path)
    if not path.name.startswith(STAGED_PREFIX):
        raise ValueError(f"{path}: not a staged dataset (its name must start with {STAGED_PREFIX!r})")
    shutil.rmtree(path, ignore_errors=True)


def _open_archive(path: Path, filename: str, settings: UploadLimits) -> _Archive:
    """Opens a zip or tar by content; 415 for anything else, 400 for a damaged or oversized zip listing."""
    if zipfile.is_zipfile(path):
        try:
            _check_central_directory(path, filename, settings)
            return _ZipArchive(zipfile.ZipFile(path))
        except READ_ERRORS as error:
            raise UploadError(400, filename, f"damaged zip archive ({error}); create it again") from error
    try:
        extension_bytes = settings.max_archive_entries * TAR_EXTENSION_BYTES_PER_ENTRY
        # TarFile.open passes extra keywords on to the class; typeshed's overloads list only TarFile's own.
        tar = _BoundedTarFile.open(path, "r:*", extension_bytes=extension_bytes)  # type: ignore[call-overload]
        return _TarArchive(tar)
    except _TarHeaderRefused as refusal:
        raise refusal.upload_error(filename) from None
    except READ_ERRORS:  # not a tar, or one that ends before its first member (e.g. a truncated gzip)
        pass
    damaged = " (or a damaged or truncated one)" if filename.lower().endswith(ARCHIVE_SUFFIXES) else ""
    raise UploadError(
        415,
        filename,
        f"not a zip or tar archive{damaged}; upload the dataset folder as one of {ACCEPTED_FORMATS}",
    )


# ZipFile's end-record reader and header constants: private, so typeshed does not declare them.
_ZIP_PRIVATE: Any = zipfile


def _check_central_directory(path: Path, filename: str, settings: UploadLimits) -> None:
    """Counts a zip's members and bounds its central directory before ``zipfile.ZipFile`` reads it.

    ZipFile reads the whole directory into memory and builds an object (about 500 bytes) for every header
    in it, whatever count the end record declares. This finds the directory as ZipFile does (through the
    same end-record reader, ZIP64 record included) and walks its headers without keeping them.
    """
    limit = settings.max_archive_entries
    with path.open("rb", buffering=COPY_CHUNK_BYTES) as file:
        end = _ZIP_PRIVATE._EndRecData(file)  # what ZipFile itself reads first; is_zipfile found it
        size = end[_ZIP_PRIVATE._ECD_SIZE]
        start = end[_ZIP_PRIVATE._ECD_LOCATION] - size  # ZipFile's start_dir, prepended data accounted for
        if end[_ZIP_PRIVATE._ECD_SIGNATURE] == _ZIP_PRIVATE.stringEndArchive64:
            start -= _ZIP_PRIVATE.sizeEndCentDir64 + _ZIP_PRIVATE.sizeEndCentDir64Locator
        if start < 0:
            return  # ZipFile refuses it: "Bad offset for central directory"
        file.seek(start)
        count = walked = 0
        while walked < size:
            header = file.read(_ZIP_PRIVATE.sizeCentralDir)
            if len(header) < _ZIP_PRIVATE.sizeCentralDir or header[:4] != _ZIP_PRIVATE.stringCentralDir:
                break  # ZipFile stops here too, refusing the archive as damaged
            count += 1
            if count > limit:
                raise UploadError(
                    400, filename, f"more than {limit} members; split the dataset into several tasks"
                )
            variable = sum(struct.unpack_from("<3H", header, 28))  # name, extra field and comment lengths
            file.seek(variable, os.SEEK_CUR)
            walked += _ZIP_PRIVATE.sizeCentralDir + variable
    plausible = limit * CENTRAL_DIRECTORY_BYTES_PER_ENTRY
    if size > plausible:
        raise UploadError(
            400,
            filename,
            f"the zip's central directory (its list of members) has {size} bytes, more than the {plausible} "
            f"allowed ({CENTRAL_DIRECTORY_BYTES_PER_ENTRY} per member); the archive is damaged or crafted",
        )


class _ZipArchive:
    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive

    def entries(self) -> Iterator[_Entry]:
        for info in self.archive.infolist():
            name = info.orig_filename  # ZipInfo.filename is cut at a NUL byte; the original is not
            mode = info.external_attr >> 16
            if info.create_system == 3 and mode:  # Unix: the file type is in the high bits
                _check_file_type(name, mode)
            if info.flag_bits & 0x1:
                raise UploadError(400, name, "encrypted member; upload an archive without a password")
            if info.compress_type not in ZIP_METHODS:
                raise UploadError(
                    400,
                    name,
                    f"compression method {info.compress_type} is not supported; "
                    f"use one of {', '.join(ZIP_METHODS.values())}",
                )
            yield _Entry(name, _name_parts(name), info.is_dir(), info.file_size, info.compress_size, info)

    def open(self, entry: _Entry) -> IO[bytes]:
        if not isinstance(entry.handle, zipfile.ZipInfo):
            raise TypeError(f"{entry.name}: not a member of a zip archive")
        return self.archive.open(entry.handle)

    def close(self) -> None:
        self.archive.close()


class _TarHeaderRefused(Exception):
    """A tar header refused while tarfile reads it (it becomes an UploadError naming the upload)."""

    def __init__(self, member: str | None, message: str) -> None:
        super().__init__(member, message)
        self.member = member
        self.message = message

    def upload_error(self, filename: str) -> UploadError:
        return UploadError(400, self.member or filename, self.message)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header reader that refuses oversized and chained extension headers before reading them.

    ``TarInfo._proc_member`` is tarfile's hook for reading members of each type; the data of a GNU
    long-name or PAX header is read whole by the method it calls, so the size is checked here first.
    Sparse members are refused here as well: their maps are read block by block without a bound.
    """

    def _proc_member(self, archive: _BoundedTarFile) -> tarfile.TarInfo:
        if self.type in TAR_EXTENSION_KINDS:
            archive.count_extension(self)
        elif self.type == tarfile.GNUTYPE_SPARSE:
            raise _TarHeaderRefused(self.name, SPARSE_ENTRY)
        return super()._proc_member(archive)  # type: ignore[misc]  # tarfile's hook, private: not in typeshed

    def _proc_gnusparse_10(
        self, member: tarfile.TarInfo, pax_headers: dict[str, str], archive: tarfile.TarFile
    ) -> None:
        """Refuses a GNU sparse 1.0 member (announced in a PAX header) before its map is read."""
        raise _TarHeaderRefused(member.name, SPARSE_ENTRY)


class _BoundedTarFile(tarfile.TarFile):
    """A TarFile reading headers through :class:`_BoundedTarInfo`, which counts here what each member and
    the whole archive spend on extension headers.

    Args:
        *args: As for ``tarfile.TarFile``.
        extension_bytes: The most bytes of long-name and PAX headers (global ones aside) in the archive.
        **kwargs: As for ``tarfile.TarFile``.
    """

    tarinfo = _BoundedTarInfo

    def __init__(self, *args: Any, extension_bytes: int, **kwargs: Any) -> None:
        self.extension_bytes = extension_bytes
        self.member_headers = 0  # extension headers read before the member being read
        self.member_header_bytes = 0
        self.archive_header_bytes = 0  # long-name and PAX headers of the archive so far
        self.global_header_bytes = 0  # PAX global headers so far
        super().__init__(*args, **kwargs)  # reads the first member

    def next(self) -> tarfile.TarInfo | None:
        self.member_headers = self.member_header_bytes = 0
        return super().next()

    def count_extension(self, header: tarfile.TarInfo) -> None:
        """Counts an extension header against the bounds before its data is read.

        Raises:
            _TarHeaderRefused: When the headers of the member, of the archive or the global ones pass a bound.
        """
        kind = TAR_EXTENSION_KINDS[header.type]
        self.member_headers += 1
        if self.member_headers > MAX_TAR_EXTENSION_HEADERS:
            raise _TarHeaderRefused(
                None,
                f"more than {MAX_TAR_EXTENSION_HEADERS} extension headers (GNU long-name or PAX) in a row "
                f"at byte {header.offset} of the tar; the archive is damaged or crafted",
            )
        if header.type == tarfile.XGLTYPE:
            self.global_header_bytes += header.size
            bounds = [
                (self.global_header_bytes, MAX_TAR_GLOBAL_EXTENSION_BYTES, "the archive's PAX global headers")
            ]
        else:
            self.member_header_bytes += header.size
            self.archive_header_bytes += header.size
            bounds = [
                (self.member_header_bytes, MAX_TAR_MEMBER_EXTENSION_BYTES, "the headers of one member"),
                (self.archive_header_bytes, self.extension_bytes, "the archive's long-name and PAX headers"),
            ]
        for spent, bound, scope in bounds:
            if spent > bound:
                raise _TarHeaderRefused(
                    None,
                    f"{kind} of {header.size} bytes at byte {header.offset} of the tar: {scope} would take "
                    f"{spent} bytes, more than the {bound} allowed (a member path takes at most "
                    f"{MAX_PATH_BYTES}); the archive is damaged or crafted",
                )


class _TarArchive:
    def __init__(self, archive: tarfile.TarFile) -> None:
        self.archive = archive

    def entries(self) -> Iterator[_Entry]:
        for member in self.archive:  # reads one header at a time, so a limit stops the listing early
            member.pax_headers = {}  # its copy of the PAX records (global ones included), applied already
            if member.issym() or member.islnk():
                raise UploadError(
                    400,
                    member.name,
                    f"link to {_shown(repr(member.linkname))}; archives may hold only regular files and "
                    "folders (copy the file instead of linking it)",
                )
            if not (member.isreg() or member.isdir()):
                raise UploadError(400, member.name, SPECIAL_ENTRY)
            if member.sparse is not None:
                raise UploadError(400, member.name, SPARSE_ENTRY)
            yield _Entry(member.name, _name_parts(member.name), member.isdir(), member.size, None, member)

    def open(self, entry: _Entry) -> IO[bytes]:
        if not isinstance(entry.handle, tarfile.TarInfo):
            raise TypeError(f"{entry.name}: not a member of a tar archive")
        handle = self.archive.extractfile(entry.handle)
        assert handle is not None  # regular members always have data
        return handle

    def close(self) -> None:
        self.archive.close()


def _check_file_type(name: str, mode: int) -> None:
    """Refuses links and special files by the Unix mode a zip member carries (no type bits: a file)."""
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise UploadError(
            400, name, "symbolic link; archives may hold only regular files and folders (zip without -y)"
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UploadError(400, name, SPECIAL_ENTRY)


def _check_ratio(name: str, uncompressed: int, compressed: int, limit: float, what: str) -> None:
    """Refuses a decompression bomb: more than RATIO_FLOOR_BYTES expanding beyond the allowed ratio."""
    if uncompressed > RATIO_FLOOR_BYTES and uncompressed > limit * max(compressed, 1):
        raise UploadError(
            400,
            name,
            f"{what} expands from {compressed} to {uncompressed} bytes, a ratio above the {limit:g} allowed "
            "(decompression bomb guard); images and masks should already be compressed (PNG, JPEG)",
        )


def _name_parts(name: str) -> tuple[str, ...]:
    """Checks a member name and returns its normalised components."""
    if _CONTROL.search(name):
        raise UploadError(400, repr(name), "name holds a NUL or control character; rename the file")
    if "\\" in name:
        raise UploadError(400, name, "name holds a backslash; archive with '/' as the path separator")
    if name.startswith("/") or _DRIVE.match(name):
        raise UploadError(400, name, "absolute path; archive paths relative to the dataset folder")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UploadError(
            400, name, "'..' path component (zip slip); archive paths inside the dataset folder"
        )
    if len(name.encode()) > MAX_PATH_BYTES:
        raise UploadError(400, name, f"path longer than {MAX_PATH_BYTES} bytes; shorten the folder names")
    if any(len(part.encode()) > MAX_NAME_PART_BYTES for part in parts):
        raise UploadError(400, name, f"a path component is longer than {MAX_NAME_PART_BYTES} bytes")
    return parts


def _is_litter(parts: tuple[str, ...]) -> bool:
    """macOS additions: resource forks and Finder state, never part of a dataset."""
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


def _list_entries(
    archive: _Archive, filename: str, archive_bytes: int, settings: UploadLimits
) -> tuple[list[_Entry], str | None]:
    """Lists and checks every member before anything is written.

    Returns:
        The members to extract (files and folders, litter left out) and the one top folder they all
        sit in (stripped on extraction), or None.
    """
    ratio = settings.max_compression_ratio
    kept: list[_Entry] = []
    files: set[tuple[str, ...]] = set()
    count = total = 0
    try:
        for entry in archive.entries():
            count += 1
            if count > settings.max_archive_entries:
                raise UploadError(
                    400,
                    filename,
                    f"more than {settings.max_archive_entries} members; split the dataset into several tasks",
                )
            total += entry.size
            if total > settings.max_uncompressed_bytes:
                raise UploadError(
                    400,
                    entry.name,
                    f"the members up to this one expand to {total} bytes, more than the "
                    f"{settings.max_uncompressed_bytes} allowed in total (decompression bomb guard)",
                )
            if entry.compressed is not None:
                _check_ratio(entry.name, entry.size, entry.compressed, ratio, "member")
            _check_ratio(filename, total, archive_bytes, ratio, "the archive")
            if not entry.parts:
                if entry.is_dir:
                    continue  # "./", the archive root itself
                raise UploadError(400, entry.name, "file without a name")
            if not entry.is_dir:
                if entry.parts in files:
                    raise UploadError(400, entry.name, "duplicate member name; keep one file per path")
                files.add(entry.parts)
            if not _is_litter(entry.parts):
                kept.append(entry)
    except _TarHeaderRefused as refusal:
        raise refusal.upload_error(filename) from None
    except READ_ERRORS as error:
        raise UploadError(400, filename, f"damaged archive ({error}); create it again") from error
    for entry in kept:
        clash = next((entry.parts[:n] for n in range(1, len(entry.parts)) if entry.parts[:n] in files), None)
        if clash is None and entry.is_dir and entry.parts in files:
            clash = entry.parts
        if clash is not None:
            raise UploadError(
                400, entry.name, f"'{_shown('/'.join(clash))}' is both a file and a folder in the archive"
            )
    kept_files = [entry for entry in kept if not entry.is_dir]
    if not kept_files:
        raise UploadError(422, filename, "the archive holds no files; put the dataset folder in it")
    tops = {entry.parts[0] for entry in kept}
    top = tops.pop() if len(tops) == 1 and all(len(entry.parts) > 1 for entry in kept_files) else None
    return kept, top


def _extract(archive: _Archive, entries: list[_Entry], staged: Path, top: str | None) -> int:
    """Writes the members under ``staged`` (minus the top folder); returns the bytes written."""
    written = 0
    for entry in entries:
        parts = entry.parts[1:] if top is not None else entry.parts
        target = staged.joinpath(*parts)
        if entry.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            source = archive.open(entry)
        except READ_ERRORS as error:
            raise _damaged(entry, error) from error
        try:
            with source, target.open("xb") as sink:
                copied = _copy(source, sink, entry)
        except FileExistsError as error:
            raise UploadError(400, entry.name, "duplicate member name; keep one file per path") from error
        if copied != entry.size:
            raise UploadError(
                400,
                entry.name,
                f"member holds {copied} bytes, its header says {entry.size}; the archive is damaged",
            )
        written += copied
    return written


def _copy(source: IO[bytes], sink: IO[bytes], entry: _Entry) -> int:
    """Copies a member, stopping as soon as it yields more than its declared size.

    zipfile and tarfile already stop at the declared size; reading at most one byte past it keeps the
    guard independent of them.
    """
    copied = 0
    while True:
        try:
            chunk = source.read(min(COPY_CHUNK_BYTES, entry.size + 1 - copied))  # one byte past is enough
        except READ_ERRORS as error:
            raise _damaged(entry, error) from error
        if not chunk:
            return copied
        copied += len(chunk)
        if copied > entry.size:
            raise UploadError(
                400,
                entry.name,
                f"member yields more than the {entry.size} bytes its header declares "
                "(decompression bomb guard); the archive is damaged or crafted",
            )
        sink.write(chunk)


def _damaged(entry: _Entry, error: Exception) -> UploadError:
    return UploadError(400, entry.name, f"damaged member ({error}); create the archive again")


def _validate(
    staged: Path,
    top: str | None,
    filename: str,
    written: int,
    settings: UploadLimits,
    known_classes: list[str],
) -> StagedDataset:
    """Reads and validates the extracted dataset; DataError -> 422 naming the archive member."""
    try:
        source = read_source(staged)
        report = validate_dataset(source, known_classes, settings.max_image_pixels)
    except DataError as error:
        prefix = f"{top}/" if top else ""
        parts = error.path.relative_to(staged).parts if error.path.is_relative_to(staged) else ()
        entry = "/".join([top, *parts] if top else parts) or filename
        problem = error.problem.replace(f"{staged}/", prefix).replace(str(staged), top or ".")
        problem = _cut_middle(problem, SHOWN_PROBLEM_CHARS)
        raise UploadError(422, entry, problem) from error
    if report.supervision == "weak" and list(known_classes) == ["background"]:
        weak = sum(sample.is_weak for sample in source.train)
        raise UploadError(
            422,
            f"{top}/{LABELS_FILE}" if top else LABELS_FILE,
            f"step 0 needs masks: {weak} training image(s) have image-level labels only, and the first task "
            "(no model yet) learns its classes from masks; post a dataset with masks first, then weak labels",
        )
    return StagedDataset(
        path=staged,
        classes=list(source.classes),
        new_classes=list(report.new_classes),
        train_images=len(source.train),
        val_images=len(source.val),
        bytes=written,
        supervision=report.supervision,
    )
