"""``POST /segment``: segment one image with the serving model version, at a bounded cost per request.

The image is never converted or processed at its full size: a JPEG is decoded at a reduced scale
(``Image.draft``), other images are reduced to the serving size (a PNG is decoded in its own mode, 1 to 4
bytes per pixel, then reduced before conversion to RGB), and the model runs at the serving size, on one batch
of the images of concurrent requests (:mod:`service.batcher`; the decode and encode of each request run in
worker threads of :mod:`service.api.admission`, the model in the batcher's). Each answer
is built from the serving-size label map: the ``png`` mask by a nearest-neighbour resize to the image's size
(1 byte per pixel), the ``json`` fractions by weighting each serving-size label with the mask pixels it
becomes, the ``overlay`` preview at most ``OVERLAY_MAX_SIDE`` pixels on its longest side.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import parse_options_header

from export.processing import Letterbox, class_areas, mask_image, overlay, preprocess, resize_nearest
from service.api.admission import Admission
from service.api.deps import ModelServerDep, SettingsDep
from service.api.schemas import ErrorBody, SegmentSummary
from service.api.upload import read_file_part
from service.batcher import Batcher
from service.model_server import Lease, ModelServer

router = APIRouter(tags=["segment"])

IMAGE_FIELD = "image"
VERSION_HEADER = "X-Model-Version"
MAX_IMAGE_BYTES = 64 * 1024 * 1024
READABLE_FORMATS = ("PNG", "JPEG")  # PIL's JPEG opener also reads the multi-picture JPEGs (MPO) of cameras
OVERLAY_MAX_SIDE = 1024
OVERLAY_QUALITY = 90
# modes PIL filters in place; 1-bit, palette and 16-bit images (which PIL cannot filter) and images with
# alpha (which PIL would copy at full size to premultiply it; the alpha is dropped anyway) are reduced by
# nearest neighbour to NEAREST_OVERSAMPLING times the target size first, converted to RGB there, then filtered
FILTERABLE_MODES = frozenset({"L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"})
NEAREST_OVERSAMPLING = 2
REDUCING_GAP = 3.0  # PIL reduces by an integer factor (box filter) down to 3x the target, then filters
TOO_LARGE = f"images are limited to {MAX_IMAGE_BYTES} bytes; send a smaller image"


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


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded at a bounded size.

    Attributes:
        height: Rows of the image as sent.
        width: Columns of the image as sent.
        model_input: RGB uint8 (h, w, 3) fitted within the model's canvas (the image itself when it fits).
        preview: RGB uint8 fitted within ``OVERLAY_MAX_SIDE`` (None unless asked for).
    """

    height: int
    width: int
    model_input: np.ndarray
    preview: np.ndarray | None


def fit_within(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    """``size`` (height, width) scaled down, keeping its aspect ratio, to fit ``bound``; never scaled up."""
    if size[0] <= bound[0] and size[1] <= bound[1]:
        return size
    box = Letterbox.fit(size, bound)
    return box.height, box.width


def _resized_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (h, w, 3) of ``image`` resized to ``size`` = (h, w), with no full-size RGB copy."""
    target = (size[1], size[0])
    if image.size == target:
        return np.asarray(image.convert("RGB"))
    if image.mode not in FILTERABLE_MODES:
        coarse = (
            min(image.width, NEAREST_OVERSAMPLING * target[0]),
            min(image.height, NEAREST_OVERSAMPLING * target[1]),
        )
        image = image.resize(coarse, Image.Resampling.NEAREST).convert("RGB")
    resized = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return np.asarray(resized.convert("RGB"))


def decode_image(
    data: bytes, max_pixels: int, canvas: tuple[int, int], with_preview: bool = False
) -> DecodedImage:
    """Decodes a PNG or JPEG at the size the model (and the overlay preview) needs.

    The pixel count is checked before any pixel is decoded; a JPEG is decoded at the smallest DCT scale
    that still covers both sizes.

    Args:
        data: The file's bytes.
        max_pixels: Largest width x height accepted.
        canvas: The model's input (H, W).
        with_preview: Also make the overlay preview.

    Returns:
        The image's size and its reduced RGB copies; the full-size decoded image is released on return.

    Raises:
        HTTPException: 422 for bytes that are no PNG or JPEG, a truncated or corrupt image, or more than
            ``max_pixels`` pixels (a decompression bomb: a few kilobytes that decode to gigabytes).
    """
    try:
        with Image.open(io.BytesIO(data), formats=READABLE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    detail=f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (INCSEG_MAX_IMAGE_PIXELS); send a smaller image",
                )
            model_size = fit_within((height, width), canvas)
            preview_size = fit_within((height, width), (OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
            needed = model_size
            if with_preview:
                needed = (max(model_size[0], preview_size[0]), max(model_size[1], preview_size[1]))
            image.draft("RGB", (needed[1], needed[0]))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
            return DecodedImage(
                height,
                width,
                _resized_rgb(image, model_size),
                _resized_rgb(image, preview_size) if with_preview else None,
            )
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
    image: DecodedImage, labels: np.ndarray, classes: list[str], version: str, output: OutputFormat
) -> tuple[bytes, str]:
    """The answer body and its media type for an image and its serving-size label map (h', w')."""
    size = (image.height, image.width)
    if output is OutputFormat.JSON:
        fractions = {name: area / 100.0 for name, area in class_areas(labels, classes, size).items()}
        summary = SegmentSummary(
            version=version, width=image.width, height=image.height, classes=classes, fractions=fractions
        )
        return summary.model_dump_json().encode(), "application/json"
    buffer = io.BytesIO()
    if output is OutputFormat.PNG:
        mask_image(resize_nearest(labels, size)).save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    if image.preview is None:
        raise ValueError("an overlay needs the image decoded with its preview (with_preview=True)")
    preview_labels = resize_nearest(labels, image.preview.shape[:2])
    blended = overlay(image.preview, preview_labels)
    Image.fromarray(blended).save(buffer, format="JPEG", quality=OVERLAY_QUALITY)
    return buffer.getvalue(), "image/jpeg"


@dataclass(frozen=True)
class PreparedImage:
    """An image decoded and letterboxed for the runtime leased for its request.

    Attributes:
        lease: The request's lease on the serving runtime (returned once the answer is encoded).
        image: The decoded image.
        model_input: Normalised float32 (3, H, W) on the runtime's canvas.
        box: Where the image lies on the canvas.
    """

    lease: Lease
    image: DecodedImage
    model_input: np.ndarray
    box: Letterbox


def _prepare(server: ModelServer, data: bytes, output: OutputFormat, max_pixels: int) -> PreparedImage:
    """Leases the serving runtime, decodes the image and letterboxes it (blocking: run in a thread)."""
    lease = server.acquire()
    try:
        runtime = lease.runtime
        image = decode_image(data, max_pixels, runtime.size, with_preview=output is OutputFormat.OVERLAY)
        batch, (box,) = preprocess([image.model_input], runtime.size, runtime.mean, runtime.std)
    except BaseException:
        lease.release()
        raise
    return PreparedImage(lease, image, batch[0], box)


def _answer(prepared: PreparedImage, canvas_labels: np.ndarray, output: OutputFormat) -> Response:
    """Encodes the answer from the canvas label map uint8 (H, W), then returns the lease (blocking)."""
    try:
        runtime, box = prepared.lease.runtime, prepared.box
        labels = canvas_labels[box.top : box.top + box.height, box.left : box.left + box.width]
        body, media_type = _encode(prepared.image, labels, runtime.classes, runtime.version, output)
        return Response(body, media_type=media_type, headers={VERSION_HEADER: runtime.version})
    finally:
        prepared.lease.release()


async def _read_image_bytes(request: Request) -> bytes:
    """The image of a multipart ``image`` field or of a raw body with an ``image/*`` content type.

    Either is read chunk by chunk into memory and refused with 413 once it passes ``MAX_IMAGE_BYTES``,
    whether or not the request declares a Content-Length.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_IMAGE_BYTES + 64 * 1024:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=TOO_LARGE)
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data":
        data = await read_file_part(request, IMAGE_FIELD, MAX_IMAGE_BYTES, TOO_LARGE)
        if data is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"no file in the multipart field {IMAGE_FIELD!r}; attach the image there",
            )
        return data
    if not content_type.startswith(b"image/"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"send the image as the raw body with an image/* content type or in the multipart field "
            f"{IMAGE_FIELD!r} (got content type {content_type.decode('latin-1') or 'none'!r})",
        )
    buffer = io.BytesIO()  # its getvalue() hands over the bytes without a copy
    async for chunk in request.stream():
        if buffer.tell() + len(chunk) > MAX_IMAGE_BYTES:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=TOO_LARGE)
        buffer.write(chunk)
    return buffer.getvalue()


@router.post(
    "/segment",
    summary="Segment an image",
    response_class=Response,
    openapi_extra={"requestBody": IMAGE_BODY},
    responses={
        200: {
            "description": "png: palette mask at the image's size (pixel value = class index), resized by "
            "nearest neighbour from the model's serving-size output; json: class fractions of that mask; "
            f"overlay: JPEG of the image with the classes coloured, at most {OVERLAY_MAX_SIDE} px on its "
            "longest side.",
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
            "description": "Not a decodable PNG or JPEG image, or too many pixels.",
            "headers": VERSION_HEADER_DOC,
        },
        503: {
            "model": ErrorBody,
            "description": "Busy: every work slot and queue place is taken; retry after Retry-After seconds.",
            "headers": {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {}},
                **VERSION_HEADER_DOC,
            },
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
    """Segments the image with the serving model; the answer's X-Model-Version header names the version.

    At most ``INCSEG_SEGMENT_CONCURRENCY + INCSEG_SEGMENT_QUEUE`` requests of the process are admitted;
    a request beyond those is answered 503 with ``Retry-After`` before its body is read. Of those, at most
    ``INCSEG_SEGMENT_CONCURRENCY`` decode or encode at once; in between, the model runs the images of
    requests that arrive within ``INCSEG_BATCH_WINDOW_MS`` as one batch (``service.batcher``).
    """
    admission: Admission = request.app.state.segment_admission
    batcher: Batcher = request.app.state.segment_batcher
    try:
        async with admission.admit():
            with batcher.on_the_way():  # open windows wait for this request's image
                data = await _read_image_bytes(request)
                prepared = await admission.run(_prepare, server, data, output, settings.max_image_pixels)
                del data  # a request waiting for its batch holds its reduced copies only, not its body
            try:
                canvas_labels = await batcher.labels(prepared.lease.runtime, prepared.model_input)
                return await admission.run(_answer, prepared, canvas_labels, output)
            finally:
                prepared.lease.release()  # a no-op once the answer is encoded
    except HTTPException as err:  # refused input: still say which version serves
        version = server.status().serving_version
        if version is not None:
            err.headers = {**(err.headers or {}), VERSION_HEADER: version}
        raise
