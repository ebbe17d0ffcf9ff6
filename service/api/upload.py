"""Streams a multipart upload to a file or to memory, enforcing the size limit while the bytes arrive.

Starlette's own form parsing spools a whole upload (to memory, then to the system temp folder) before the
endpoint runs, so a 3 GiB upload would be stored in full before a limit could refuse it. Here each chunk of
the request body goes through python-multipart's push parser: the file part is written as it arrives (under
the staging folder for ``POST /tasks``, to memory for ``POST /segment``) and the request is refused with 413
the moment it passes the limit; nothing is written to the system temp folder.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fastapi import HTTPException, Request, status
from python_multipart.multipart import MultipartParser, parse_options_header

from service.staging import UPLOAD_PART_PREFIX

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 1024
MAX_PARTS = 16


@dataclass
class StreamedUpload:
    """A multipart body received: the small form fields, and the one file written to ``path``.

    Attributes:
        fields: Form field name -> text value.
        filename: The file part's client-side name ("" when the client gave none).
        path: Where the file's bytes were written, when received to disk (the caller deletes it).
        size: Bytes of the file.
    """

    fields: dict[str, str] = field(default_factory=dict)
    filename: str = ""
    path: Path | None = None
    size: int = 0

    def saved_path(self) -> Path:
        """``path`` of an upload received to disk (every one that :func:`stream_upload` returns).

        Raises:
            ValueError: The file part was not written to a file.
        """
        if self.path is None:
            raise ValueError("the upload was not written to a file")
        return self.path


class _PartCollector:
    """python-multipart callbacks that route each part to a form field or to the upload file.

    The file stays open until :meth:`close` (the owner closes it once the body has been read).

    Args:
        file_field: Name of the one file part.
        open_file: Opens what the file part is written to (and sets ``upload.path`` if it is a file).
        max_bytes: Largest file accepted.
        too_large: The 413 ``detail`` once the file passes ``max_bytes``.
        upload: What is received.
        keep_fields: Collect the other parts as form fields (each at most ``MAX_FIELD_BYTES``); False
            drops them, counting their bytes with the file's against ``max_bytes``.
    """

    def __init__(
        self,
        file_field: str,
        open_file: Callable[[], IO[bytes]],
        max_bytes: int,
        too_large: str,
        upload: StreamedUpload,
        keep_fields: bool = True,
    ) -> None:
        self.file_field = file_field
        self.open_file = open_file
        self.max_bytes = max_bytes
        self.too_large = too_large
        self.upload = upload
        self.keep_fields = keep_fields
        self.dropped = 0
        self.parts = 0
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.field_name: str | None = None
        self.field_value = bytearray()
        self.file: IO[bytes] | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self._append_header("header_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._append_header("header_value", data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def _append_header(self, attribute: str, data: bytes) -> None:
        setattr(self, attribute, getattr(self, attribute) + data)
        if len(self.header_field) + len(self.header_value) > MAX_FIELD_BYTES:
            raise _bad_request("a multipart header is longer than 1 KiB")

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _bad_request(f"more than {MAX_PARTS} form parts; send the archive and the options only")
        self.headers = {}
        self.field_name = None
        self.field_value = bytearray()

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise _bad_request("a form part has no Content-Disposition: form-data; name=... header")
        self.field_name = name.decode("utf-8", "replace")
        if self.field_name == self.file_field:
            if self.file is not None:
                raise _bad_request(f"send one file in the {self.file_field!r} field, not several")
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.upload.filename = Path(filename.replace("\\", "/")).name
            self.file = self.open_file()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.field_name == self.file_field:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=self.too_large)
            if self.file is None:  # python-multipart calls on_headers_finished, which opens it, first
                raise _bad_request("file data before the part's headers")
            self.file.write(data[start:end])
        elif not self.keep_fields:
            self.dropped += end - start
            if self.upload.size + self.dropped > self.max_bytes:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=self.too_large)
        else:
            self.field_value += data[start:end]
            if len(self.field_value) > MAX_FIELD_BYTES:
                raise _bad_request(f"form field {self.field_name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self.field_name is not None and self.field_name != self.file_field:
            self.upload.fields[self.field_name] = self.field_value.decode("utf-8", "replace")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, detail=f"malformed multipart body: {message}")


def _boundary(request: Request) -> bytes:
    """The boundary of a ``multipart/form-data`` request (the caller has checked the content type)."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise _bad_request("the Content-Type header has no boundary")
    return boundary


async def _receive(request: Request, collector: _PartCollector) -> None:
    """Feeds the body to python-multipart chunk by chunk; on any error closes and deletes the partial file.

    Raises:
        HTTPException: 413 from the collector, 400 for a malformed body or a client that went away.
    """
    parser = MultipartParser(_boundary(request), collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        collector.close()
        _delete(collector.upload.path)
        raise
    except Exception as err:  # python-multipart's parse errors, a client that went away
        collector.close()
        _delete(collector.upload.path)
        raise _bad_request(str(err) or type(err).__name__) from err


async def stream_upload(request: Request, file_field: str, directory: Path, max_bytes: int) -> StreamedUpload:
    """Receives a ``multipart/form-data`` body whose file part ``file_field`` goes to a file in ``directory``.

    Args:
        request: The request whose body is read.
        file_field: Name of the one file part.
        directory: Folder for the file (created when missing).
        max_bytes: Largest file accepted.

    Returns:
        The fields and the file's location; the caller deletes ``path``.

    Raises:
        HTTPException: 415 for another content type, 413 past ``max_bytes`` (from the Content-Length header
            before reading, else while streaming), 400 for a malformed body or a missing file part; on any
            error the partial file is deleted.
    """
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"send multipart/form-data with the archive in the {file_field!r} file field "
            f"(got content type {content_type.decode('latin-1') or 'none'!r})",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + 64 * MAX_FIELD_BYTES:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"the request is {declared} bytes, over the upload limit of {max_bytes} bytes "
            "(INCSEG_MAX_UPLOAD_BYTES); send a smaller archive",
        )
    directory.mkdir(parents=True, exist_ok=True)
    upload = StreamedUpload()

    def open_file() -> IO[bytes]:
        file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (the collector closes it)
            dir=directory, prefix=UPLOAD_PART_PREFIX, suffix=".part", delete=False
        )
        upload.path = Path(file.name)
        return file

    too_large = (
        f"the upload is larger than the limit of {max_bytes} bytes (INCSEG_MAX_UPLOAD_BYTES); "
        "send a smaller archive"
    )
    collector = _PartCollector(file_field, open_file, max_bytes, too_large, upload)
    await _receive(request, collector)
    collector.close()
    if upload.path is None:
        raise _bad_request(f"no file in the {file_field!r} field; attach the dataset archive there")
    return upload


async def read_file_part(request: Request, file_field: str, max_bytes: int, too_large: str) -> bytes | None:
    """The bytes of the file part ``file_field`` of a ``multipart/form-data`` body, received into memory.

    The other parts are dropped as they arrive.

    Args:
        request: The request whose body is read (its content type is multipart/form-data).
        file_field: Name of the one file part.
        max_bytes: Largest file accepted; the body is refused while streaming once its parts pass it.
        too_large: The 413 ``detail``.

    Returns:
        The file's bytes, or None when the body has no part ``file_field``.

    Raises:
        HTTPException: 413 past ``max_bytes``, 400 for a malformed body.
    """
    upload = StreamedUpload()
    buffer = io.BytesIO()
    collector = _PartCollector(file_field, lambda: buffer, max_bytes, too_large, upload, keep_fields=False)
    await _receive(request, collector)
    return buffer.getvalue() if collector.file is not None else None


def _delete(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
