"""Which stored images may be shown or sent, told by their first bytes: JPEG and PNG, the two the cameras deliver
and the face stage decodes. Anything else in the image store is refused, not handed to an image library that would
decode it (GIF, TIFF, EPS through Ghostscript) or to a reader that would be told the wrong type."""

from __future__ import annotations

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_TYPES = ((JPEG_MAGIC, "image/jpeg"), (PNG_MAGIC, "image/png"))
"""First bytes -> media type of every image format the pipeline shows."""
PIL_FORMATS = ("JPEG", "PNG")
"""The same formats as Pillow names them (``Image.open(..., formats=PIL_FORMATS)``)."""


def image_type(data: bytes) -> str | None:
    """``image/jpeg`` or ``image/png`` by ``data``'s first bytes; ``None`` for anything else."""
    return next((media for magic, media in IMAGE_TYPES if data.startswith(magic)), None)
