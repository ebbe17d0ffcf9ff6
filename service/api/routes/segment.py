"""``POST /segment``: segment one image with the serving model version."""

from __future__ import annotations

import io
from enum import StrEnum
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile

from export.processing import class_areas, mask_image, overlay
from service.api.deps import ModelServerDep, SettingsDep
from service.api.schemas import ErrorBody, SegmentSummary
from service.model_server import ModelServer

router = APIRouter(tags=["segment"])

IMAGE_FIELD = "image"
VERSION_HEADER = "X-Model-Version"
MAX_IMAGE_BYTES = 64 * 1024 * 1024
OVERLAY_QUALITY = 90


class OutputFormat(StrEnum):
    """What ``POST /segment`` answers."""

    PNG = "png"
    JSON = "json"
    OVERLAY = "overlay"


IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [IMAGE_FIELD],
                "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
            }
        },
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}
VERSION_HEADER_DOC = {
    VERSION_HEADER: {"description": "Model version that produced the answer.", "schema": {}}
}


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decodes image bytes to RGB uint8 (h, w, 3), checking the pixel count before decoding any pixel.

    Raises:
        HTTPException: 422 for bytes that are no image, a truncated or corrupt image, or more than
            ``max_pixels`` pixels (a decompression bomb: a few kilobytes that decode to gigabytes).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    detail=f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (INCSEG_MAX_IMAGE_PIXELS); send a smaller image",
                )
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="the body is in no image format the service reads; send a PNG or JPEG file",
        ) from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"the image could not be decoded ({err}); send a complete, valid PNG or JPEG file",
        ) from err


def _encode(
    image: np.ndarray, labels: np.ndarray, classes: list[str], version: str, output: OutputFormat
) -> tuple[bytes, str]:
    """The answer body and its media type for an image (h, w, 3) and its label map (h, w)."""
    if output is OutputFormat.JSON:
        fractions = {name: area / 100.0 for name, area in class_areas(labels, classes).items()}
        summary = SegmentSummary(
            version=version, width=image.shape[1], height=image.shape[0], classes=classes, fractions=fractions
        )
        return summary.model_dump_json().encode(), "application/json"
    buffer = io.BytesIO()
    if output is OutputFormat.PNG:
        mask_image(labels).save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    Image.fromarray(overlay(image, labels)).save(buffer, format="JPEG", quality=OVERLAY_QUALITY)
    return buffer.getvalue(), "image/jpeg"


def _segment(server: ModelServer, data: bytes, output: OutputFormat, max_pixels: int) -> Response:
    """Decodes, segments and encodes one image under a model-server lease (blocking: run in a thread)."""
    with server.lease() as runtime:
        image = decode_image(data, max_pixels)  # (h, w, 3) uint8
        labels = runtime.predict([image])[0]  # (h, w) uint8 class indices
        body, media_type = _encode(image, labels, runtime.classes, runtime.version, output)
        return Response(body, media_type=media_type, headers={VERSION_HEADER: runtime.version})


async def _read_image_bytes(request: Request) -> bytes:
    """The image of a multipart ``image`` field or of a raw body with an ``image/*`` content type."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_IMAGE_BYTES + 64 * 1024:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, detail=f"images are limited to {MAX_IMAGE_BYTES} bytes"
        )
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:
            part = form.get(IMAGE_FIELD)
            if not isinstance(part, UploadFile):
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    detail=f"no file in the multipart field {IMAGE_FIELD!r}; attach the image there",
                )
            data = await part.read(MAX_IMAGE_BYTES + 1)
    elif content_type.startswith(b"image/"):
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_IMAGE_BYTES:
                break
        data = bytes(data)
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"send the image as the raw body with an image/* content type or in the multipart field "
            f"{IMAGE_FIELD!r} (got content type {content_type.decode('latin-1') or 'none'!r})",
        )
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, detail=f"images are limited to {MAX_IMAGE_BYTES} bytes"
        )
    return data


@router.post(
    "/segment",
    summary="Segment an image",
    response_class=Response,
    openapi_extra={"requestBody": IMAGE_BODY},
    responses={
        200: {
            "description": "png: palette mask at the image's size (pixel value = class index); json: class "
            "fractions; overlay: JPEG of the image with the classes coloured.",
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": SegmentSummary.model_json_schema()},
            },
            "headers": VERSION_HEADER_DOC,
        },
        409: {"model": ErrorBody, "description": "No model is serving yet: post a base task first."},
        413: {
            "model": ErrorBody,
            "description": "The image file is too large.",
            "headers": VERSION_HEADER_DOC,
        },
        415: {
            "model": ErrorBody,
            "description": "Neither multipart nor an image content type.",
            "headers": VERSION_HEADER_DOC,
        },
        422: {
            "model": ErrorBody,
            "description": "Not a decodable image, or too many pixels.",
            "headers": VERSION_HEADER_DOC,
        },
    },
)
async def segment(
    request: Request,
    settings: SettingsDep,
    server: ModelServerDep,
    output: Annotated[
        OutputFormat, Query(alias="format", description="png (default), json or overlay")
    ] = OutputFormat.PNG,
) -> Response:
    """Segments the image with the serving model; the answer's X-Model-Version header names the version."""
    try:
        data = await _read_image_bytes(request)
        return await run_in_threadpool(_segment, server, data, output, settings.max_image_pixels)
    except HTTPException as err:  # refused input: still say which version serves
        version = server.status().serving_version
        if version is not None:
            err.headers = {**(err.headers or {}), VERSION_HEADER: version}
        raise
