"""Image decoding: every mode becomes upright RGB; every broken file gets a named reason."""

import io

import numpy as np
import pytest
from PIL import Image

from graft.errors import ImageError
from graft.images import MAX_IMAGE_PIXELS, load_image


def _png(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kw)
    return buffer.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kw)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())  # a real photo (300x451 RGB)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as error:
        load_image(path)
    assert error.value.path == str(path)


def test_truncated_jpeg(tmp_path, photo):
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg(photo)[:2000])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "gone.png")


def test_cmyk_jpeg_becomes_rgb(photo):
    image = load_image(_jpeg(photo.convert("CMYK")))
    assert image.mode == "RGB" and image.size == photo.size
    assert abs(np.asarray(image, float).mean() - np.asarray(photo, float).mean()) < 12


def test_16_bit_png_is_rescaled(photo):
    gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    image = load_image(_png(Image.fromarray(gray)))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image)[..., 0].astype(int) - np.asarray(photo.convert("L"), int)).max() <= 1


def test_palette_with_transparency_composites_on_white():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    image = load_image(_png(palette, transparency=0))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_exif_rotation_is_applied(photo):
    rotated = photo.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with the tag that says "rotate 90 clockwise to view"
    image = load_image(_jpeg(rotated, exif=exif.tobytes(), quality=95))
    assert image.size == photo.size
    assert np.abs(np.asarray(image, float) - np.asarray(photo, float)).mean() < 8


def test_one_pixel_image():
    image = load_image(_png(Image.new("L", (1, 1), 128)))
    assert image.size == (1, 1) and image.mode == "RGB"


def test_decompression_bomb_is_refused_before_decoding():
    # A tiny PNG whose header claims more pixels than the limit.
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    data = _png(Image.new("1", (side, side)), optimize=True)
    assert len(data) < 5_000_000
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, name="bomb.png")


def test_keep_gray_returns_one_channel_only_for_grayscale(photo):
    gray = load_image(_png(photo.convert("L")), keep_gray=True)
    assert gray.mode == "L"
    assert np.array_equal(np.asarray(gray), np.asarray(load_image(_png(photo.convert("L"))))[..., 0])
    deep = load_image(_png(Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)), keep_gray=True)
    assert deep.mode == "L"
    assert load_image(_png(photo), keep_gray=True).mode == "RGB"
    assert load_image(_png(photo.convert("LA")), keep_gray=True).mode == "RGB"  # alpha is composited
