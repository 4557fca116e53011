"""The input pipeline: the split transform equals timm's, batches come in order, decoded images are reused."""

from __future__ import annotations

from pathlib import Path

import torch

from graft.images import load_image
from graft.pipeline import DecodedImages, EvalImages, image_batches, split_transform
from graft.preprocessing import build_transforms


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


def test_store_budget_and_worker_processes(lite0, fashion_folder: Path) -> None:
    transform = build_transforms(lite0.preprocessing)
    paths = _images(fashion_folder)[:4]
    one_image = 3 * 224 * 224
    store = DecodedImages(budget_bytes=2 * one_image)
    keys = [p.name for p in paths]
    threaded = torch.cat(list(image_batches(paths, transform, batch_size=3, keys=keys, store=store)))
    assert len(store) == 2 and store.used_bytes <= store.budget_bytes
    processes = torch.cat(list(image_batches(paths, transform, batch_size=3, keys=keys, store=store, workers=1)))
    torch.testing.assert_close(processes, threaded)


def test_eval_images_is_reiterable(lite0, fashion_folder: Path) -> None:
    from graft.data import load_labelled_folder

    split = load_labelled_folder(fashion_folder)[0]
    batches = EvalImages(split.paths[:5], split.digests[:5], lite0.preprocessing, batch_size=2)
    assert len(batches) == 3
    first, second = torch.cat(list(batches)), torch.cat(list(batches))
    assert first.shape == (5, 3, 224, 224)
    torch.testing.assert_close(first, second)
