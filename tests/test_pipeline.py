"""The input pipeline: the split transform equals timm's, batches come in order, decoded images are reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from graft.input.images import load_image
from graft.input.pipeline import DecodedImages, EvalImages, ResizeCenterCrop, image_batches, split_transform
from graft.input.preprocessing import build_transforms


def _images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_split_transform_equals_the_whole_transform(lite0, fashion_folder: Path) -> None:
    transform = build_transforms(lite0.preprocessing)
    split = split_transform(transform)
    assert split is not None
    paths = _images(fashion_folder)[:5]
    expected = torch.stack([transform(load_image(p)) for p in paths])
    got = split.normalize(torch.stack([split.pixels(load_image(p)) for p in paths]))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_the_evaluation_resize_and_crop_run_as_one_resize_on_fashion_mnist(lite0, fashion_folder: Path) -> None:
    """The default transform's Resize + CenterCrop become one Pillow resize of the crop's box for
    these 28 px squares, with the two steps' pixels exactly."""
    transform = build_transforms(lite0.preprocessing)
    steps = transform.transforms[:2]
    split = split_transform(transform)
    assert isinstance(split.pil, ResizeCenterCrop)
    for path in _images(fashion_folder)[:10]:
        for keep_gray in (True, False):
            image = load_image(path, keep_gray=keep_gray)
            expected = np.asarray(steps[1](steps[0](image)))
            assert np.array_equal(np.asarray(split.pil(image)), expected)
    assert split.pil._exact == {(28, 28): True}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize, crop", [(256, 224), (224, 224), (288, 256), (248, 224), ((256, 320), 224)])
def test_fused_resize_and_crop_equal_the_two_steps_bit_for_bit(interpolation: str, resize: int | tuple, crop: int) -> None:
    """Every size, fused or not (non-square pictures, sizes whose box Pillow would sample at
    other positions, padding, no resize at all), gives the pixels of Resize then CenterCrop."""
    steps = [transforms.Resize(resize, interpolation=transforms.InterpolationMode(interpolation)),
             transforms.CenterCrop(crop)]

    def two_steps(image: Image.Image) -> Image.Image:
        return steps[1](steps[0](image))

    fused = ResizeCenterCrop.of(steps, fallback=two_steps)
    assert fused is not None
    rng = np.random.default_rng(0)
    sizes = [(s, s) for s in (8, 28, 32, 100, 184, 230, 256, 299, 300, 651)] + [(184, 230), (500, 375), (20, 700)]
    for width, height in sizes:
        for mode, shape in (("L", (height, width)), ("RGB", (height, width, 3))):
            image = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
            assert np.array_equal(np.asarray(fused(image)), np.asarray(two_steps(image))), (width, height, mode)
    squares = {(w, h) for w, h in sizes if w == h and w != resize} if isinstance(resize, int) else set()
    if resize in (256, 224):
        # A size over 256 is a short binary fraction, and a crop as large as the resize is a box
        # of the whole picture: every square is fused, so the equality above tested the box.
        assert {size for size, exact in fused._exact.items() if exact} == squares
    assert set(fused._exact) <= squares  # other shapes never reach the check


def test_batches_keep_order_and_reuse_decoded_images(lite0, fashion_folder: Path) -> None:
    transform = build_transforms(lite0.preprocessing)
    paths = _images(fashion_folder)[:7]
    store = DecodedImages(budget_bytes=10**9)
    keys = [p.name for p in paths]
    first = torch.cat(list(image_batches(paths, transform, batch_size=3, keys=keys, store=store)))
    assert len(store) == 7
    expected = torch.stack([transform(load_image(p)) for p in paths])
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    # The second pass reads only from the store: files that vanished are not needed.
    missing = [p.with_name("gone-" + p.name) for p in paths]
    again = torch.cat(list(image_batches(missing, transform, batch_size=3, keys=keys, store=store)))
    torch.testing.assert_close(again, first)
    # So does the worker-process path: it needs no file either.
    again = torch.cat(list(image_batches(missing, transform, batch_size=3, keys=keys, store=store, workers=2)))
    torch.testing.assert_close(again, first)


def test_store_budget_and_worker_processes(lite0, fashion_folder: Path) -> None:
    transform = build_transforms(lite0.preprocessing)
    paths = _images(fashion_folder)[:4]
    one_image = 224 * 224  # Fashion-MNIST pictures are grayscale: kept as one channel
    store = DecodedImages(budget_bytes=2 * one_image)
    keys = [p.name for p in paths]
    threaded = torch.cat(list(image_batches(paths, transform, batch_size=3, keys=keys, store=store)))
    assert len(store) == 2 and store.used_bytes <= store.budget_bytes
    processes = torch.cat(list(image_batches(paths, transform, batch_size=3, keys=keys, store=store, workers=1)))
    torch.testing.assert_close(processes, threaded)


def test_eval_images_is_reiterable(lite0, fashion_folder: Path) -> None:
    from graft.input.data import load_labelled_folder

    split = load_labelled_folder(fashion_folder)[0]
    batches = EvalImages(split.paths[:5], split.digests[:5], lite0.preprocessing, batch_size=2)
    assert len(batches) == 3
    first, second = torch.cat(list(batches)), torch.cat(list(batches))
    assert first.shape == (5, 3, 224, 224)
    torch.testing.assert_close(first, second)


def test_grayscale_images_go_through_as_one_channel_with_the_same_pixels(lite0, fashion_folder: Path, tmp_path: Path) -> None:
    """The evaluation view resizes a grayscale file as one channel (a third of the work); the batch
    must equal, bit for bit, the timm transform applied to its RGB conversion."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from graft.models.backbones import with_crop

    photo = tmp_path / "chelsea-gray.png"  # a real photo, not square, as 8-bit grayscale
    Image.fromarray(data.chelsea()).convert("L").save(photo)
    deep = tmp_path / "camera-16bit.png"  # and as 16-bit grayscale
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(deep)
    color = tmp_path / "coffee.png"  # a colour photo in the same batch stays RGB
    Image.fromarray(data.coffee()).save(color)
    paths = _images(fashion_folder)[:4] + [photo, deep, color]
    assert load_image(paths[0], keep_gray=True).mode == "L"
    for crop in (lite0.preprocessing.crop_pct, 1.0):
        backbone = with_crop(lite0, crop)
        transform = build_transforms(backbone.preprocessing)
        split = split_transform(transform)
        assert split.channel_blind
        assert not split_transform(build_transforms(backbone.preprocessing, augment="light")).channel_blind
        from_rgb = split.normalize(torch.stack([split.pixels(load_image(p)) for p in paths]))
        got = torch.cat(list(image_batches(paths, transform, batch_size=3, store=None)))
        assert torch.equal(got, from_rgb), f"crop {crop}: {(got - from_rgb).abs().max()}"
        # Worker processes, and the in-memory store (which keeps grayscale pictures as one channel).
        store = DecodedImages(10**9)
        keys = [f"{p.name}.{crop}" for p in paths]
        for workers in (1, 0):  # a process decodes and fills the store; the thread's pass reads it back
            batches = image_batches(paths, transform, batch_size=3, keys=keys, store=store, workers=workers)
            assert torch.equal(torch.cat(list(batches)), from_rgb), f"crop {crop}, {workers} workers"
        assert store.get(keys[0]).shape[-1] == 1 and store.get(keys[-1]).shape[-1] == 3
        expected = torch.stack([transform(load_image(p)) for p in paths])  # timm's, to 1 ulp
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_normalize_matches_torch_arithmetic() -> None:
    """NumPy's plane-wise multiply-add gives the same float32 bits as torch's: colour with
    per-channel statistics, colour with equal ones, and grayscale widened to three channels."""
    from graft.input.pipeline import SplitTransform

    generator = torch.Generator().manual_seed(0)
    for mean, std in (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)):
        split = SplitTransform(lambda image: image, mean, std)
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
        colour = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=generator)
        colour[0, :, :, 0] = torch.arange(256, dtype=torch.uint8).view(16, 16)  # every level once
        gray = torch.randint(0, 256, (2, 16, 16, 1), dtype=torch.uint8, generator=generator)
        for pixels in (colour, gray):
            expected = pixels.expand(-1, -1, -1, 3).permute(0, 3, 1, 2).to(torch.float32).mul_(scale).add_(shift)
            got = split.normalize(pixels)
            assert got.shape == (2, 3, 16, 16)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got, expected), (mean, pixels.shape)


def test_training_batches_normalised_on_the_device_equal_the_workers_float_batches(lite0, fashion_folder) -> None:
    """graft's GPU input path (uint8 from the workers, `normalizer_on`) gives the pixels the
    whole augmenting transform gives, draw for draw (run here on the CPU tensors it takes)."""
    import random

    import numpy as np

    from graft.input.data import load_labelled_folder
    from graft.input.images import load_image
    from graft.input.pipeline import split_transform

    paths = load_labelled_folder(fashion_folder)[0].paths[:4]
    for level in ("light", "strong"):
        transform = build_transforms(lite0.preprocessing, augment=level)
        split = split_transform(transform)
        assert split is not None, f"the {level} augmentation can no longer be cut at ToTensor"
        for index, path in enumerate(paths):
            image = load_image(path)
            torch.manual_seed(index), random.seed(index), np.random.seed(index)
            whole = transform(image)
            torch.manual_seed(index), random.seed(index), np.random.seed(index)
            on_device = split.normalizer_on(torch.device("cpu"))(split.pixels(image)[None])[0]
            assert on_device.shape == whole.shape
            assert torch.allclose(on_device, whole, rtol=0, atol=1e-6), (level, path)


def test_decoding_processes_are_sized_to_the_device() -> None:
    """A CPU keeps its decode thread (the model needs the cores); a GPU gets all cores but one."""
    import os

    from graft.input.pipeline import extraction_workers
    from graft.strategies.finetune import training_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only named: no GPU is needed
    spare = max(1, min(16, (os.cpu_count() or 2) - 1))
    assert extraction_workers(100_000, cpu) == 0
    assert extraction_workers(100, cuda) == 0  # too few images to be worth starting processes
    assert extraction_workers(1_000, cuda) == spare
    assert training_workers(32, cuda) == training_workers(32, cpu) == 0
    assert training_workers(1_000, cuda) == spare
    assert training_workers(1_000, cpu) == max(1, min(4, (os.cpu_count() or 2) - 1))


def test_strong_augmented_views_are_reproducible(lite0, fashion_folder) -> None:
    """RandAugment picks its operations with NumPy's generator: a view must not depend on what
    NumPy drew before it."""
    import numpy as np

    from graft.input.data import load_labelled_folder
    from graft.training.features import extract_features

    split = load_labelled_folder(fashion_folder)[0]
    paths, digests = split.paths[:6], split.digests[:6]

    def view(noise: int) -> torch.Tensor:
        np.random.seed(noise)  # whatever came before
        return extract_features(lite0, paths, digests, cache=None, augment="strong", view=1, seed=0, batch_size=3)

    first, again = view(1), view(2)
    assert torch.equal(first, again)
    other = extract_features(lite0, paths, digests, cache=None, augment="strong", view=2, seed=0, batch_size=3)
    assert not torch.equal(first, other)
