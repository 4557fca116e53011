"""Image decoding: every mode becomes upright RGB; every broken file gets a named reason."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.errors import ImageError
from graft.input.images import MAX_IMAGE_PIXELS, load_image


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


def _enlarged(path, side: int, fmt: str) -> bytes:
    """A real photo enlarged to `side` x 3/4 `side` (bicubic), as a camera-sized file."""
    picture = Image.open(path).convert("RGB").resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
    return _jpeg(picture, quality=92) if fmt == "JPEG" else _png(picture)


def test_min_size_decodes_large_photos_smaller_with_the_same_predictions(foolbox_imagenet):
    import torch

    from graft.models.backbones import load_backbone
    from graft.input.images import REDUCING_GAP
    from graft.input.preprocessing import build_transforms

    backbone = load_backbone("efficientnet_lite0", keep_classifier=True)
    transform = build_transforms(backbone.preprocessing)
    min_size = backbone.preprocessing.resize_size
    assert min_size == 256  # 224 / crop_pct 0.875, timm's eval resize

    def probabilities(images):
        with torch.no_grad():
            return backbone.imagenet_classifier(backbone.model(torch.stack([transform(i) for i in images]))).softmax(1)

    files = [_enlarged(path, 4000, "JPEG") for path, _ in foolbox_imagenet]
    files += [_enlarged(path, 3000, "PNG") for path, _ in foolbox_imagenet[:4]]
    full = [load_image(data) for data in files]
    reduced = [load_image(data, min_size=min_size) for data in files]
    for big, small in zip(full, reduced):
        assert small.mode == "RGB" and min(small.size) >= REDUCING_GAP * min_size
        assert small.size[0] * 2 <= big.size[0]  # decoded (JPEG) or reduced (PNG) by 2 or more
    expected, got = probabilities(full), probabilities(reduced)
    assert torch.equal(expected.argmax(1), got.argmax(1))
    difference = (expected - got).abs().max(1).values  # per photo; saving it again as JPEG moves it as much
    assert float(difference.max()) < 0.04 and float(difference.mean()) < 0.015


@pytest.mark.parametrize(
    "mode, fill, expected",
    [
        ("1", 1, (255, 255, 255)),
        ("L", 90, (90, 90, 90)),
        ("I;16", 30000, (117, 117, 117)),  # 30000 / 65535 of full scale, as without min_size
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # transparent: composited on white
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_min_size_reduces_every_mode_to_its_colours(mode, fill, expected):
    image = Image.new(mode, (2400, 1800), fill)
    data = _png(image) if mode != "CMYK" else _jpeg(image, quality=100)
    reduced = load_image(data, min_size=200)
    assert reduced.mode == "RGB" and reduced.size == (600, 450)
    assert np.abs(np.asarray(reduced, dtype=int) - expected).max() <= 2
    assert np.array_equal(np.asarray(reduced)[0, 0], np.asarray(load_image(data))[0, 0])


def test_min_size_averages_palette_colours_not_indices():
    palette = Image.new("P", (2400, 1800), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (1200, 0, 2400, 1800))  # left half red (index 0), right half blue (index 1)
    reduced = np.asarray(load_image(_png(palette), min_size=200))
    assert tuple(reduced[225, 100]) == (255, 0, 0) and tuple(reduced[225, 500]) == (0, 0, 255)


def test_image_size_reads_the_header_only():
    from graft.errors import ImageTooLargeError
    from graft.input.images import image_size

    bomb = _png(Image.new("1", (9990, 9990)))
    assert len(bomb) < 20_000 and image_size(bomb, name="bomb.png") == (9990, 9990)
    with pytest.raises(ImageTooLargeError, match="huge.png"):
        image_size(_png(Image.new("1", (12000, 9000))), name="huge.png")
    with pytest.raises(ImageError, match="notes.txt.*not an image"):
        image_size(b"hello", name="notes.txt")


def _phone_photo(picture: Image.Image, orientation: int) -> bytes:
    """`picture` at 12 MP (4032x3024), stored turned as a phone's sensor holds it, with its EXIF tag."""
    turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    enlarged = picture.convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
    return _jpeg(enlarged.transpose(turn), exif=exif.tobytes(), quality=90)


def test_predict_decodes_phone_photos_at_the_size_the_model_needs(trained_run, tmp_path, monkeypatch):
    import graft
    from skimage import data

    bundle = graft.load_bundle(trained_run.run_dir)
    files = []
    for name, orientation in [("chelsea", 6), ("astronaut", 8), ("coffee", 3)]:
        files.append(tmp_path / f"{name}.jpg")
        files[-1].write_bytes(_phone_photo(Image.fromarray(getattr(data, name)()), orientation))
    full = bundle.predict([load_image(path) for path in files])  # PIL pictures are taken as they are

    seen = []
    transform = bundle.transform
    monkeypatch.setattr(bundle, "transform", lambda image: seen.append(image.size) or transform(image))
    fast = bundle.predict(files)
    # Upright (landscape, as photographed) and decoded at a fraction of the 4032x3024 pixels.
    assert all(1024 > width > height >= bundle.preprocessing.resize_size for width, height in seen)
    assert [p.label for p in fast] == [p.label for p in full]
    for quick, exact in zip(fast, full):
        assert abs(quick.score - exact.score) < 0.05


def _heic(picture: Image.Image, orientation: int | None = None) -> bytes:
    """`picture` encoded as HEIC by pillow-heif (HEVC), without registering its opener with Pillow."""
    import pillow_heif

    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    pillow_heif.from_pillow(picture).save(buffer, quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture
def pillow_without_heif(monkeypatch):
    """Pillow's registry of openers as in a fresh process: pillow-heif registers its own when it encodes."""
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if k != "HEIF"})
    monkeypatch.setattr(Image, "ID", [k for k in Image.ID if k != "HEIF"])


def test_heic_is_read_upright_from_its_exif_orientation(photo, pillow_without_heif):
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # held as the sensor saw it, tag 6 turns it back
    image = load_image(_heic(stored, orientation=6), name="IMG_0001.HEIC")
    assert image.mode == "RGB" and image.size == photo.size
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(photo, dtype=int)).mean() < 6


def test_heic_without_the_heif_extra_names_it(photo, tmp_path, monkeypatch, pillow_without_heif):
    """Without the extra, a HEIC file is named as such, not as a file Pillow cannot read."""
    import graft.input.images

    path = tmp_path / "IMG_0002.heic"
    path.write_bytes(_heic(photo))
    monkeypatch.setattr(graft.input.images, "_heif_opener_registered", lambda: False)  # pillow-heif absent
    with pytest.raises(ImageError, match=r'IMG_0002.heic.*HEIC/HEIF.*pip install "graft\[heif\]"'):
        load_image(path)


def test_avif_files_are_images(photo, tmp_path):
    from graft.input.images import is_image_name

    path = tmp_path / "photo.avif"
    photo.save(path, format="AVIF", quality=90)
    assert is_image_name(path)
    assert np.abs(np.asarray(load_image(path), dtype=int) - np.asarray(photo, dtype=int)).mean() < 6


def test_a_folder_of_heic_photos_trains_and_predicts(foolbox_imagenet, tmp_path, pillow_without_heif):
    import graft

    root = tmp_path / "data"
    for path, label in foolbox_imagenet:  # ImageNet classes 0-397 are animals
        folder = root / ("animal" if label < 398 else "object")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{path.stem}.heic").write_bytes(_heic(Image.open(path).convert("RGB")))
    run = graft.train(root, strategy="feature-extract", out=tmp_path / "run", epochs=20, verbose=False)
    files = sorted(root.glob("*/*.heic"))
    predictions = list(graft.predict(run.run_dir, files))
    assert len(predictions) == len(files) == 20
    right = sum(p.label == Path(p.path).parent.name for p in predictions)
    assert right >= 17
