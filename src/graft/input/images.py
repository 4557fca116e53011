"""Reading one image file into an upright RGB picture, or a clear reason why not.

Everything that opens a user's image goes through `load_image` (training, predict, serve), so
every command converts modes, applies EXIF orientation and refuses hostile files the same way.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from graft.errors import ImageError, ImageTooLargeError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
    | {".heic", ".heif", ".hif", ".avif"}  # HEIC/HEIF with the `heif` extra (pillow-heif); AVIF by Pillow
)

# Images larger than this many pixels are refused before any pixel is decoded (a decompression
# bomb is a small file that claims an enormous size). 40 000 x 40 000 would be 1.6 G pixels.
MAX_IMAGE_PIXELS = 100_000_000

# Pillow's own guard; ours is checked from the header first so the message can be clear.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def is_image_name(path: Path) -> bool:
    """True for a file name graft treats as an image (by extension, case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    source: str | Path | bytes, *, name: str | None = None, keep_gray: bool = False, min_size: int | None = None
) -> Image.Image:
    """Decode an image file (a path or its bytes) into an upright 8-bit RGB image.

    Grayscale, palette, alpha (composited on white), CMYK and 16-bit images are converted to RGB;
    EXIF orientation is applied. Raises `ImageError` naming the file and the reason for an empty,
    truncated, corrupt, non-image or oversized file (`ImageTooLargeError` for too many pixels).

    `keep_gray=True` returns a grayscale picture as 8-bit "L" instead (its RGB would be three
    equal channels): a caller whose transform treats the channels alike (resize, crop) resizes
    one channel instead of three and copies it afterwards, with the same pixels to the bit.

    `min_size` is the shortest side the caller will resize the picture to (the model's resize,
    `Preprocessing.resize_size`). A larger picture is then decoded at a reduced scale (JPEG's DCT
    scaling) or reduced by a whole factor right after decoding, in its own mode, as long as its
    shortest side stays at least `REDUCING_GAP` times `min_size` (Pillow's `thumbnail` does the
    same): no RGB copy of a full-size picture is made, and a 12 MP phone JPEG is decoded at a
    quarter of its width. On 48 real photos at 4032x3024 (bench/predict_large.py), an ImageNet
    model's top-1 is the same as from the full picture, its probabilities move by 0.009 on average
    and 0.036 at most, and its features keep a cosine above 0.999 (saving the JPEG again at quality
    85 moves them by 0.005 and 0.020).

    HEIC/HEIF files are read with graft's `heif` extra (pillow-heif), AVIF by Pillow itself.

    >>> load_image("photo.jpg", min_size=256).size  # a 4032x3024 JPEG
    (1008, 756)
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    data = _read_bytes(source, label)
    with _decoding(label):
        image = _open(data, label)
        # Pillow's `draft` is libjpeg-turbo's DCT scaling, as simplejpeg and PyTurboJPEG offer: on
        # 4032x3024 JPEGs they took 0.85-0.94 of its time (bench/photos.py), a few percent of a
        # prediction, not worth a dependency and a second path for EXIF orientation and modes.
        if min_size is not None:
            image.draft(None, (REDUCING_GAP * min_size, REDUCING_GAP * min_size))
        image.load()
    if min_size is not None:
        image = _reduce(image, min_size)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost the picture itself
        pass
    if keep_gray and image.mode in GRAY_MODES:
        return to_gray(image)
    return to_rgb(image)


def image_size(source: str | Path | bytes, *, name: str | None = None) -> tuple[int, int]:
    """The (width, height) an image file declares in its header, read without decoding a pixel.

    Raises what `load_image` raises for a file that is not an image or declares too many pixels,
    so a caller can check its own pixel limits before paying for the decoding.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    with _decoding(label):
        return _open(_read_bytes(source, label), label).size


# `load_image(min_size=...)` keeps at least this many times the final size before the last resize
# (Pillow's `thumbnail` default). 4 gives the same top-1 on real photos, with probabilities half as
# far from the full picture's (0.005 against 0.009 on average), for a decode 1.5 times slower.
REDUCING_GAP = 2


def _open(data: bytes, label: str) -> Image.Image:
    """The lazily opened image, its header checked against graft's limits; no pixel decoded yet."""
    if not data:
        raise ImageError(label, "the file is empty (0 bytes); remove it or replace it with the image")
    _check_heif_support(data, label)
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            label,
            f"the image claims {width}x{height} pixels, more than graft's limit of "
            f"{MAX_IMAGE_PIXELS:,} (a decompression bomb or a huge scan); resize it first",
        )
    if width < 1 or height < 1:
        raise ImageError(label, f"the image has no pixels ({width}x{height})")
    return image


# Brands of an ISO base media file ("ftyp" box) that say its pictures are HEVC (HEIC) or AV1 (AVIF).
HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})


def _container_brands(data: bytes) -> set[bytes]:
    """The major and compatible brands of a HEIF/AVIF file's "ftyp" box; empty for other files."""
    if data[4:8] != b"ftyp":
        return set()
    box_size = int.from_bytes(data[0:4], "big")
    brands = data[8:12] + data[16 : min(max(box_size, 16), 256)]
    return {brands[i : i + 4] for i in range(0, len(brands) - 3, 4)}


def _check_heif_support(data: bytes, label: str) -> None:
    """`ImageError` naming what to install for a HEIC or AVIF file this install cannot decode."""
    brands = _container_brands(data)
    if brands & AVIF_BRANDS and not brands & HEIC_BRANDS:
        if not _pillow_reads_avif():
            raise ImageError(
                label,
                f"an AVIF image, and this Pillow ({Image.__version__}) cannot read AVIF; "
                'install a Pillow that does: pip install -U "pillow>=11.3"',
            )
    elif brands & HEIC_BRANDS and not _heif_opener_registered():
        raise ImageError(
            label,
            "a HEIC/HEIF image, which needs graft's heif extra (pillow-heif); "
            'install it: pip install "graft[heif]"',
        )


def _heif_opener_registered() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow where it is not yet; False without it."""
    if "HEIF" in Image.OPEN:
        return True
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def _pillow_reads_avif() -> bool:
    from PIL import features

    return bool(features.check("avif"))


@contextmanager
def _decoding(label: str) -> Iterator[None]:
    """Pillow's exceptions while opening or decoding, as an `ImageError` that names the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(label, "not an image file Pillow can read (wrong content for its name?)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            label,
            f"the image claims more pixels than graft's limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb "
            f"or a huge scan: {exc}); resize it first",
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(label, f"the image data is damaged or truncated ({exc})") from None


def _reduce(image: Image.Image, min_size: int) -> Image.Image:
    """`image` shrunk by the largest whole factor that keeps its short side >= REDUCING_GAP * min_size.

    Averaging needs pixel values, not palette indices or bits: those modes are converted first.
    """
    factor = min(image.size) // (REDUCING_GAP * min_size)
    if factor < 2:
        return image
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = to_rgb(image)
    elif image.mode.startswith("I;16"):
        return _high_depth_to_gray(image.convert("I").reduce(factor), top=65535.0)
    return image.reduce(factor)


# Single-channel modes without alpha: their RGB conversion copies one channel three times.
GRAY_MODES = ("L", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_gray(image: Image.Image) -> Image.Image:
    """A single-channel image as 8-bit "L" (16-bit and float rescaled as `to_rgb` does)."""
    if image.mode == "L":
        return image
    if image.mode == "1":
        return image.convert("L")
    return _high_depth_to_gray(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white, 16-bit rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_gray(image).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_gray(image: Image.Image, top: float | None = None) -> Image.Image:
    """16-bit, 32-bit integer or float pixels rescaled to 8-bit "L" (from 0..`top` when given)."""
    array = np.asarray(image, dtype=np.float64)
    if top is None:
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    if image.mode == "F":
        lo, hi = float(array.min(initial=0)), float(array.max(initial=1))
        array = (array - lo) / max(hi - lo, 1e-12) * 255.0
    else:
        array = array / top * 255.0
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")


def _read_bytes(source: str | Path | bytes, label: str) -> bytes:
    if isinstance(source, bytes):
        return source
    return read_image_file(Path(source), label)


def read_image_file(path: Path, label: str | None = None) -> bytes:
    """The bytes of an image file, or `ImageError` naming it (missing, a folder, unreadable).

    Only a regular file is opened: opening a FIFO blocks until something writes to it, and a
    device can be endless, so those are refused from `os.stat` first.
    """
    label = label or str(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # read_bytes below says why
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ImageError(label, "not a regular file (a FIFO, socket or device); give an image file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(label, "no such file") from None
    except IsADirectoryError:
        raise ImageError(label, "is a folder, not an image file") from None
    except OSError as exc:
        raise ImageError(label, f"cannot be read ({exc.strerror or exc})") from None
