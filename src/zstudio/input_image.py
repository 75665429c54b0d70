"""Reading an input picture (an edit's source or mask, a control image, an upscale's source): one set of checks, one
message style, for every caller.

The checks run cheapest first and before the pixels are decoded: the file exists, its bytes are within the cap, its
format is one the caller accepts (Pillow is told which, so it never tries the others), and the pixel count its header
claims is within the cap (a few kB can claim billions: a decompression bomb). Pillow's own bomb limit is turned into
an error as the backstop. Every refusal is a `ParamError` naming the field and the file (by name, never the folder
it sits in: a server's state folder is no client's business).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .params import ParamError

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP"}


@dataclass(frozen=True)
class InputImage:
    """A decoded input: the image (EXIF orientation applied), its file's bytes and what the recipe records."""

    image: Image.Image
    data: bytes
    sha256: str
    format: str

    @property
    def info(self) -> dict:
        """The recipe's view of the file: sha256, size (after EXIF orientation) and format."""
        return {"sha256": self.sha256, "size": self.image.size, "format": self.format}


def formats_text(formats: tuple[str, ...]) -> str:
    """('PNG', 'JPEG', 'WEBP') as 'PNG, JPEG or WebP'."""
    names = [FORMAT_NAMES.get(f, f) for f in formats]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def read_input_image(field: str, path: str | os.PathLike, max_pixels: int, max_bytes: int,
                     formats: tuple[str, ...] = INPUT_FORMATS, mode: str | None = None) -> InputImage:  # fmt: skip
    """Check and decode one input file (see the module docstring); `mode` converts the decoded image ("RGB")."""
    file = Path(path)
    if not file.is_file():
        raise ParamError(field, f"{str(path)!r} is not a file")
    size = file.stat().st_size
    if size > max_bytes:
        raise ParamError(field, f"{file.name} is {size / 2**20:.1f} MiB; at most {max_bytes / 2**20:g} MiB is accepted")
    data = file.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own limit, as an error
            image = Image.open(io.BytesIO(data), formats=formats)
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise ParamError(field, f"{file.name} is {image.width}x{image.height}, {pixels / 1e6:.1f} megapixels; "
                                        f"at most {max_pixels / 1e6:g} are accepted")  # fmt: skip
            image.load()
            fmt = image.format
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise ParamError(field, f"{file.name} is not a {formats_text(formats)} image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ParamError(field, f"{file.name} claims more pixels than Pillow's decompression-bomb limit") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ParamError(field, f"{file.name} could not be decoded ({err})") from None
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    return InputImage(image, data, hashlib.sha256(data).hexdigest(), fmt)
