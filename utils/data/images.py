"""Reading test images: a file that cannot be decoded is one :class:`UnreadableImage` that names it.

No image is ever skipped: that would change the test set, and so the accuracy's denominator.
"""

from __future__ import annotations

from PIL import Image

from ..system.errors import UserError

__all__ = ["UnreadableImage", "read_image"]


class UnreadableImage(UserError):
    """A test image that PIL cannot decode."""

    def __init__(self, message: str):
        # Raised in a loader worker, it reaches the main process rebuilt from torch's text, "Caught
        # UnreadableImage in DataLoader worker process 0. Original Traceback ... UnreadableImage: MESSAGE":
        # keep MESSAGE, the one line meant for the user.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rstrip().rsplit(marker, 1)[-1]
        super().__init__(message)


def read_image(path: str) -> Image.Image:
    """The RGB image in ``path``, as torchvision's ImageFolder reads it; :class:`UnreadableImage` when the file
    is no image PIL can decode (damaged, truncated, another format)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"test image {path} cannot be read ({type(error).__name__}: {error})") from None
