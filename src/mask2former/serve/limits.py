"""Bounds of the service and the decoding of uploads.

Every problem a client can cause becomes an `UploadError` carrying the HTTP status to answer with and a
one-line message naming the problem, so the app turns it into a JSON error and goes on serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mask2former.data.image_io import ImageReadError, ImageTooLargeError, load_image

# Content types accepted as a raw image body (besides any image/*); multipart/form-data carries a file field.
RAW_CONTENT_TYPES = ("application/octet-stream",)
MULTIPART = "multipart/form-data"


@dataclass
class ServeLimits:
    """What one request may cost the server."""

    max_upload_bytes: int = 20 * 1024 * 1024  # request body, multipart framing included
    max_pixels: int = 40_000_000  # width x height of the decoded image, checked from its header
    max_queue: int = 64  # requests waiting for the model; beyond it 503 + Retry-After
    timeout_s: float = 30.0  # from arrival to result; beyond it 504

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be at least 1")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s = {self.timeout_s}: must be positive")


class UploadError(Exception):
    """A bad request: `status` is the HTTP status, the message one line naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(content_type: str | None) -> str:
    """'Multipart/Form-Data; boundary=x' -> 'multipart/form-data'; '' when there is none."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_type(content_type: str | None) -> str:
    """The request's media type if /predict accepts it, else UploadError 415."""
    kind = media_type(content_type)
    if kind == MULTIPART or kind.startswith("image/") or kind in RAW_CONTENT_TYPES:
        return kind
    shown = kind or "none"
    raise UploadError(
        415,
        f"content type {shown} not accepted: send multipart/form-data with an 'image' file field, "
        "or the image bytes with an image/* or application/octet-stream content type",
    )


def check_declared_length(content_length: str | None, limits: ServeLimits) -> None:
    """Refuse early (413) a body whose Content-Length is over the limit; a bad header is a 400."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise UploadError(400, f"Content-Length {content_length!r} is not a number") from None
    if length > limits.max_upload_bytes:
        raise UploadError(413, _too_many_bytes(limits))


def check_body_size(size: int, limits: ServeLimits) -> None:
    """413 once a body being read passes the upload limit (for bodies without Content-Length)."""
    if size > limits.max_upload_bytes:
        raise UploadError(413, _too_many_bytes(limits))


def _too_many_bytes(limits: ServeLimits) -> str:
    return f"upload larger than the limit of {limits.max_upload_bytes} bytes"


def decode_upload(data: bytes, limits: ServeLimits) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB, or UploadError: 400 empty / not an image / truncated,
    413 more pixels than allowed (decompression bombs are refused from the header, before decoding)."""
    if not data:
        raise UploadError(400, "the image is empty (0 bytes)")
    try:
        return load_image(data, max_pixels=limits.max_pixels)
    except ImageTooLargeError as error:
        raise UploadError(413, _upload_message(error)) from None
    except ImageReadError as error:
        raise UploadError(400, _upload_message(error)) from None


def _upload_message(error: ImageReadError) -> str:
    return str(error).replace("<uploaded bytes>", "uploaded image", 1)
