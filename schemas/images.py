"""What kind of image a stored or fetched snapshot is, by its first bytes: JPEG or PNG, the two the cameras deliver
and the face stage decodes.

The camera client checks downloads with this, the alert sender labels the snapshot it attaches with it (a PNG must not
go out named ``snapshot.jpg`` as ``image/jpeg``), and the dashboard refuses anything else rather than hand it to an
image library that would decode it (GIF, TIFF, EPS through Ghostscript). Here, at the bottom, for producers and sinks
alike.
"""

from __future__ import annotations

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_FORMATS = ((JPEG_MAGIC, "image/jpeg", "jpg"), (PNG_MAGIC, "image/png", "png"))
"""``(first bytes, media type, file extension)`` of each image the pipeline uses."""
PIL_FORMATS = ("JPEG", "PNG")
"""The same formats as Pillow names them (``Image.open(..., formats=PIL_FORMATS)``)."""
UNKNOWN_TYPE = ("application/octet-stream", "bin")
"""What bytes of no known image are labelled: not an image type a client would try to show."""


def image_type(data: bytes) -> str | None:
    """The media type of an image the pipeline uses (``image/jpeg``, ``image/png``), None for other bytes."""
    return next((kind for magic, kind, _ in IMAGE_FORMATS if data.startswith(magic)), None)


def image_label(data: bytes, stem: str) -> tuple[str, str]:
    """``(media type, file name)`` to attach ``data`` with: ``snapshot.png`` as ``image/png`` for a PNG, and so on;
    bytes of no known image as :data:`UNKNOWN_TYPE` (``snapshot.bin``), never named as an image they are not."""
    kind, ext = next(((kind, ext) for magic, kind, ext in IMAGE_FORMATS if data.startswith(magic)), UNKNOWN_TYPE)
    return kind, f"{stem}.{ext}"
