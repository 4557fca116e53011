"""The input pipeline that keeps the model fed: decode once, overlap decoding with the forward pass.

An image becomes a model input in two steps. The PIL part of the backbone's transform (decode,
resize, crop, and for training the random augmentations) runs per image and yields 8-bit pixels;
the tensor part (scale to [0, 1], subtract the mean, divide by the std) runs once per batch, on
the whole batch, already in channels_last layout. Keeping images as uint8 until the batch is
assembled costs a quarter of the memory of float tensors, makes the per-image work a plain copy
and lets one vectorised pass normalise 64 images at once.

Decoding runs one batch ahead of the model in a background thread by default: Pillow releases the
GIL while it decodes and resamples, so on a small CPU most of the decode hides behind the forward
pass without a worker process (which would fight torch's own threads and copy every image between
processes). Not all of it: with EfficientNet-Lite0 in bf16 at 5-6 ms per image on 2 cores, graft
extracts at 0.88-0.90 of the bare forward, and at 0.93 where the model is slower (docs/benchmarks.md). `workers > 0` uses DataLoader worker
processes instead (on a GPU machine with cores to spare, where the model is much faster than
one decoding thread; `extraction_workers` picks). On a GPU every batch, for training and for
inference, crosses to the device as uint8 and is normalised there (`SplitTransform.normalizer_on`).

Evaluation-view images (`augment="none"`) are also kept, decoded and resized, in an in-memory
store keyed by file content and preprocessing, so validation every epoch, the linear probe of
`lp-ft`, `compare` and `evaluate` in the same process decode each image once. The store is bounded
(`GRAFT_DECODED_CACHE_MB`, default 1024 MB or an eighth of RAM; 0 turns it off) and simply stops adding when full.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from graft.input.images import load_image
from graft.input.preprocessing import build_transforms

DEFAULT_DECODED_CACHE_MB = 1024


@dataclass(frozen=True)
class SplitTransform:
    """A timm transform cut in two: `pil` per image → uint8 HWC, then `normalize` per batch."""

    pil: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Every PIL step treats the channels alike (resize, crop): a grayscale picture may go through
    # as one channel, copied to three afterwards, with the same pixels as its RGB conversion.
    channel_blind: bool = False

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The image through the PIL part, as a uint8 (H, W, C) tensor: C is 3, or 1 for a
        grayscale picture kept as one channel (`channel_blind`). `stack_pixels` and `normalize`
        widen that one channel to three in the pass that writes the float batch anyway, and the
        in-memory store keeps a third of the bytes for it."""
        array = np.asarray(self.pil(image), dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy())  # Pillow's array is read-only

    def normalize(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3), or (N, H, W, 1) for grayscale pictures, → float32 (N, 3, H, W) in
        channels_last layout, normalised (one channel is widened to the three it stands for).

        Permuting NHWC to NCHW *is* channels_last, so no copy changes the layout. ToTensor's /255
        and Normalize fold into one float32 multiply and one add per value (equal to torch's ops
        within 1 ulp). Each channel is computed as a contiguous plane (cast, multiply, add: three
        vectorised passes) and one `np.stack` interleaves the planes into the batch; a grayscale
        picture's three channels share one plane when their statistics are equal. Measured on 64
        images of 224 px (2-core AVX-512 CPU, one thread): 0.20 → 0.12 ms per grayscale image
        and 0.42 → 0.21 per colour one, against the 256-level lookup table this replaced (same
        bits), and 0.79 / 0.55 for the torch ops before it. NumPy does it in the calling thread
        only, where a torch op called from the decode thread starts a second OpenMP team beside
        the model's on the same cores.
        """
        array = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
        scale, shift = self._affine
        planes: dict[tuple[int, float, float], np.ndarray] = {}
        channels = []
        for channel in range(3):
            source = channel if array.shape[-1] == 3 else 0
            key = (source, float(scale[channel]), float(shift[channel]))
            if key not in planes:
                plane = array[..., source].astype(np.float32)
                plane *= scale[channel]
                plane += shift[channel]
                planes[key] = plane
            channels.append(planes[key])
        return torch.from_numpy(np.stack(channels, axis=-1)).permute(0, 3, 1, 2)

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 (3,) scale and shift: normalised = pixel * scale + shift, per channel."""
        scale = np.array([1.0 / (255.0 * s) for s in self.std], dtype=np.float32)
        shift = np.array([-m / s for m, s in zip(self.mean, self.std)], dtype=np.float32)
        return scale, shift

    def normalizer_on(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """`normalize` for uint8 (N, H, W, 3 or 1) batches already on `device` (a GPU): the same
        float32 multiply-add, run there, so a quarter of the bytes cross from the host. The
        constants go to the device once, here: making them per batch would copy from the host,
        and wait for the GPU, every training step."""
        scale, shift = (torch.from_numpy(values).to(device) for values in self._affine)

        def normalize(pixels: torch.Tensor) -> torch.Tensor:
            return (pixels.float() * scale + shift).permute(0, 3, 1, 2)

        return normalize


def stack_pixels(pixels: Sequence[torch.Tensor]) -> np.ndarray:
    """uint8 (N, H, W, C) of `SplitTransform.pixels` outputs. One-channel pictures stay one
    channel when the whole batch is; in a mixed batch they are broadcast to three while stacking."""
    arrays = [p.numpy() for p in pixels]
    if len({a.shape[-1] for a in arrays}) > 1:
        arrays = [np.broadcast_to(a, a.shape[:-1] + (3,)) for a in arrays]
    return np.stack(arrays)


def split_transform(transform: Any) -> SplitTransform | None:
    """Cut a torchvision/timm `Compose` at its ToTensor; None if it has another shape.

    Accepted: PIL-only steps, then ToTensor (or timm's MaybeToTensor), then at most a Normalize.
    Anything else (a tensor-side augmentation such as RandomErasing) is not split, and callers
    fall back to the whole transform per image.
    """
    steps = list(getattr(transform, "transforms", []))
    names = [type(step).__name__ for step in steps]
    for cut, name in enumerate(names):
        if name in ("ToTensor", "MaybeToTensor"):
            break
    else:
        return None
    rest = steps[cut + 1 :]
    if len(rest) > 1 or (rest and type(rest[0]).__name__ != "Normalize"):
        return None
    if rest:
        mean = tuple(float(v) for v in torch.as_tensor(rest[0].mean).flatten())
        std = tuple(float(v) for v in torch.as_tensor(rest[0].std).flatten())
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3:
        return None
    pil_steps = steps[:cut]

    def pil(image: Image.Image) -> Image.Image:
        for step in pil_steps:
            image = step(image)
        return image

    channel_blind = all(type(step).__name__ in CHANNEL_BLIND_STEPS for step in pil_steps)
    fused = ResizeCenterCrop.of(pil_steps, fallback=pil)
    return SplitTransform(fused or pil, mean, std, channel_blind)


# Deterministic PIL steps that resample or cut every channel the same way (checked bit for bit on
# grayscale images against their RGB conversion in tests/test_pipeline.py).
CHANNEL_BLIND_STEPS = frozenset({"Resize", "CenterCrop"})


class ResizeCenterCrop:
    """timm's evaluation `Resize` + `CenterCrop` as one Pillow resize of the crop's source box.

    Resizing the whole picture and then cutting its centre resamples pixels that are thrown away
    (about a quarter of them at timm's usual 0.875 crop). Pillow can resample just a box of the
    source to the crop's size, and its result is the same, bit for bit, when the box gives every
    output pixel the same filter centre as the whole resize did: then the fixed-point weights and
    the taps are the same. Pillow takes the box as float32 and computes the centres in double, so
    that is checked per image size by repeating its arithmetic (`_same_centres`): it holds when
    the source-to-resized scale is a short binary fraction, as for 28 or 32 px squares going to
    256 (Fashion-MNIST, MNIST, CIFAR), and fails for most other sizes, which then take the two
    steps as before. Only squares (picture, resize and crop) are fused: Pillow runs the horizontal
    and the vertical pass in an order of its own choosing, and each pass rounds to 8 bits, so the
    same weights in another order give other pixels (seen on a 184 × 230 picture); a square keeps
    the two passes alike. Other modes than L and RGB, a crop larger than the resized picture
    (padding) and a resize to the same size (none at all) take the two steps too. Measured on
    20-shot Fashion-MNIST (28 px to 256, crop 224; one thread; `bench/decode.py`): 0.82x the time
    per image with the file's decode.
    """

    def __init__(self, size: int | tuple[int, int], crop: tuple[int, int], resample: Image.Resampling,
                 fallback: Callable[[Image.Image], Image.Image]) -> None:
        self.size = size
        self.crop = crop
        self.resample = resample
        self.fallback = fallback
        self._exact: dict[tuple[int, int], bool] = {}
        from torchvision.transforms.functional import _compute_resized_output_size

        self._size_rule = _compute_resized_output_size  # torchvision's own, so the two cannot differ

    # The filters timm's evaluation transforms use; Pillow computes their weights in one function.
    FILTERS = ("bilinear", "bicubic")

    @classmethod
    def of(cls, steps: Sequence[Any], fallback: Callable[[Image.Image], Image.Image]) -> "ResizeCenterCrop | None":
        """The fused step for exactly [torchvision Resize, CenterCrop] without a size limit, else None."""
        from torchvision import transforms

        if len(steps) != 2 or type(steps[0]) is not transforms.Resize or type(steps[1]) is not transforms.CenterCrop:
            return None
        resize, crop = steps
        mode = getattr(resize.interpolation, "value", None)
        if resize.max_size is not None or mode not in cls.FILTERS:
            return None
        size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        crop_size = tuple(crop.size) if len(crop.size) == 2 else (crop.size[0], crop.size[0])
        return cls(size, crop_size, Image.Resampling[mode.upper()], fallback)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        resized_height, resized_width = self._resized(height, width)
        crop_height, crop_width = self.crop
        squares = width == height and resized_width == resized_height and crop_width == crop_height
        if (image.mode not in ("L", "RGB") or not squares or crop_width > resized_width
                or (resized_width, resized_height) == (width, height)):
            return self.fallback(image)
        top = int(round((resized_height - crop_height) / 2.0))
        left = int(round((resized_width - crop_width) / 2.0))
        exact = self._exact.get((width, height))
        if exact is None:
            exact = (_same_centres(width, resized_width, left, crop_width)
                     and _same_centres(height, resized_height, top, crop_height))
            self._exact[(width, height)] = exact
        if not exact:
            return self.fallback(image)
        box = (left * width / resized_width, top * height / resized_height,
               (left + crop_width) * width / resized_width, (top + crop_height) * height / resized_height)
        return image.resize((crop_width, crop_height), self.resample, box=box)

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the Resize step."""
        size = [self.size] if isinstance(self.size, int) else list(self.size)
        resized_height, resized_width = self._size_rule((height, width), size)
        return resized_height, resized_width

def _same_centres(in_size: int, resized: int, offset: int, crop: int) -> bool:
    """Whether Pillow samples output pixel `i` of the box resize at the same source position, in
    the same double, as pixel `offset + i` of the whole resize, with the same filter scale
    (`precompute_coeffs`: box edges are C floats, `scale = (double)(in1 - in0) / outSize`,
    `center = in0 + (xx + 0.5) * scale`)."""
    whole_scale = float(np.float32(in_size) - np.float32(0.0)) / resized
    in0 = np.float32(offset * in_size / resized)
    in1 = np.float32((offset + crop) * in_size / resized)
    box_scale = float(in1 - in0) / crop
    if max(whole_scale, 1.0) != max(box_scale, 1.0):
        return False
    start = float(in0)
    return all((offset + i + 0.5) * whole_scale == start + (i + 0.5) * box_scale for i in range(crop))


class DecodedImages:
    """Decoded, resized uint8 images kept in memory, bounded by a byte budget.

    Keys name both the file content and the preprocessing, so a changed transform never reuses a
    stale picture. When the budget is spent, new images are simply not kept (no eviction churn:
    the images already kept are the ones a run re-reads every epoch).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._items: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        return self._items.get(key)

    def put(self, key: str, pixels: torch.Tensor) -> None:
        size = pixels.numel() * pixels.element_size()
        with self._lock:
            if key in self._items or self.used_bytes + size > self.budget_bytes:
                return
            self._items[key] = pixels
            self.used_bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def _default_budget() -> int:
    """`GRAFT_DECODED_CACHE_MB`, else 1024 MB or an eighth of the machine's memory if less."""
    if "GRAFT_DECODED_CACHE_MB" in os.environ:
        try:
            return int(max(0.0, float(os.environ["GRAFT_DECODED_CACHE_MB"])) * 2**20)
        except ValueError:
            pass
    budget = DEFAULT_DECODED_CACHE_MB * 2**20
    try:
        budget = min(budget, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): keep the fixed budget
        pass
    return int(budget)


DECODED = DecodedImages(_default_budget())


def default_batch_size(device: torch.device) -> int:
    """Inference batch size: 64 on a CPU (larger gains nothing there), 256 on a GPU."""
    return 256 if device.type == "cuda" else 64


def extraction_workers(count: int, device: torch.device) -> int:
    """Decoding processes for inference over `count` images on `device`.

    0 (one decoding thread beside the model) on a CPU: there the model's forward needs the cores,
    and the thread keeps up with it (docs/benchmarks.md). On a GPU the forward is far faster than
    one thread can decode, so all cores but one decode, up to 16, once there are enough images to
    be worth starting processes for (512: a round guess, not measured; below it one thread is
    done in well under a second of decoding).
    """
    if device.type != "cuda" or count < 512:
        return 0
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def image_batches(
    paths: Sequence[Path],
    transform: Any,
    *,
    batch_size: int,
    keys: Sequence[str] | None = None,
    store: DecodedImages | None = DECODED,
    workers: int = 0,
    prefetch: int = 2,
    device: torch.device | None = None,
    min_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Normalised float batches (channels_last) of the images, in order, decoded by `load_image(min_size=...)`.

    `keys` (one per path, e.g. the file digest plus a preprocessing id) enable the in-memory
    `store`; give them only for deterministic transforms (the evaluation view), never for random
    augmentations. `workers=0` decodes in one background thread, `prefetch` batches ahead;
    `workers>0` uses that many DataLoader processes, each sending its batch as one stacked uint8
    tensor. For a CUDA `device` the batches come out on it: the uint8 pixels are pinned, copied
    without blocking (a quarter of the bytes of floats) and normalised there
    (`SplitTransform.normalizer_on`); otherwise they are normalised on the host, in the decoding
    thread where there is one.
    """
    split = split_transform(transform)
    on_gpu = device is not None and device.type == "cuda"
    chunks = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    if split is None:  # an unusual transform: the whole of it per image, still decoded ahead of the model
        yield from _whole_transform_batches(paths, transform, chunks, prefetch, min_size, device if on_gpu else None)
        return
    if store is not None and (keys is None or store.budget_bytes == 0):
        store = None
    if workers > 0:
        batches = _process_batches(paths, split, batch_size, keys, store, workers, min_size)  # uint8
        if not on_gpu:
            batches = (split.normalize(pixels) for pixels in batches)
    else:
        def decode(chunk: list[int]) -> torch.Tensor:
            found_pixels = []
            for i in chunk:
                found = store.get(keys[i]) if store is not None else None
                if found is None:
                    found = split.pixels(load_image(paths[i], keep_gray=split.channel_blind, min_size=min_size))
                    if store is not None:
                        store.put(keys[i], found)
                found_pixels.append(found)
            stacked = stack_pixels(found_pixels)
            # For the host, normalising here in the decode thread keeps that pass off the model's
            # critical path too; for a GPU, pinning here does the same for the copy.
            return torch.from_numpy(stacked).pin_memory() if on_gpu else split.normalize(stacked)

        batches = _ahead(chunks, decode, prefetch)
    if not on_gpu:
        yield from batches
        return
    normalize = split.normalizer_on(device)
    for pixels in batches:
        if not pixels.is_pinned():  # the worker-process path's batches
            pixels = pixels.pin_memory()
        yield normalize(pixels.to(device, non_blocking=True))


def _whole_transform_batches(paths: Sequence[Path], transform: Any, chunks: list[list[int]], prefetch: int,
                             min_size: int | None, gpu: torch.device | None) -> Iterator[torch.Tensor]:
    batches = _ahead(chunks, lambda chunk: torch.stack([transform(load_image(paths[i], min_size=min_size)) for i in chunk])
                     .contiguous(memory_format=torch.channels_last), prefetch)
    yield from ((batch.pin_memory().to(gpu, non_blocking=True) for batch in batches) if gpu is not None else batches)


def _ahead(chunks: list[list[int]], work: Callable[[list[int]], torch.Tensor], prefetch: int) -> Iterator[torch.Tensor]:
    """`work(chunk)` for every chunk, computed up to `prefetch` chunks ahead in one thread."""
    if prefetch <= 0 or len(chunks) <= 1:
        for chunk in chunks:
            yield work(chunk)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-decode")
    pending: deque[Future] = deque()
    try:
        upcoming = iter(chunks)
        for chunk in upcoming:
            pending.append(pool.submit(work, chunk))
            if len(pending) >= prefetch:
                break
        for chunk in upcoming:
            ready = pending.popleft().result()
            pending.append(pool.submit(work, chunk))
            yield ready
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


class _PixelFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], split: SplitTransform, min_size: int | None) -> None:
        self.paths, self.split, self.min_size = list(paths), split, min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.split.pixels(load_image(self.paths[index], keep_gray=self.split.channel_blind, min_size=self.min_size))


def _stacked(pixels: list[torch.Tensor]) -> torch.Tensor:
    """A worker's collate: its batch as one uint8 tensor, so one shared-memory block crosses to
    the main process instead of one per image."""
    return torch.from_numpy(stack_pixels(pixels))


def _process_batches(paths, split, batch_size, keys, store, workers, min_size) -> Iterator[torch.Tensor]:
    """uint8 (N, H, W, C) batches in order: worker processes decode what the store lacks (and
    start only if it lacks something)."""
    from torch.utils.data import DataLoader

    missing = [i for i in range(len(paths)) if store is None or store.get(keys[i]) is None]
    # The store keeps rows of the workers' batches as views: no copy per image, and a batch's
    # memory lives as long as one of its rows is kept. Pinning a whole batch afterwards (about 1 ms
    # for 256 images of 224 px) rather than in the DataLoader leaves those rows in ordinary memory;
    # a copy of each row out of a pinned batch cost 0.06 ms, and `clone()` 0.4 ms (it pins again),
    # per image on the H100 machine of docs/benchmarks.md.
    loader = DataLoader(_PixelFiles([paths[i] for i in missing], split, min_size), batch_size=batch_size, num_workers=workers,
                        collate_fn=_stacked)
    if missing and len(missing) == len(paths):  # nothing in the store: the workers' batches are the batches
        for start, batch in zip(range(0, len(paths), batch_size), loader):
            if store is not None:
                for offset, pixels in enumerate(batch):
                    store.put(keys[start + offset], pixels)
            yield batch
        return
    batches = None
    decoded: dict[int, torch.Tensor] = {}
    position = 0
    for start in range(0, len(paths), batch_size):
        chunk = range(start, min(start + batch_size, len(paths)))
        while any(i not in decoded and (store is None or store.get(keys[i]) is None) for i in chunk):
            if batches is None:
                batches = iter(loader)  # the processes start here, at the first image the store lacks
            for pixels in next(batches):
                decoded[missing[position]] = pixels
                position += 1
        batch = []
        for i in chunk:
            pixels = decoded.pop(i, None)
            if pixels is None:
                pixels = store.get(keys[i])
            elif store is not None:
                store.put(keys[i], pixels)
            batch.append(pixels)
        yield torch.from_numpy(stack_pixels(batch))


def preprocessing_id(preprocessing: Any, augment: str = "none") -> str:
    """A short stable id of a preprocessing (+ augmentation), for in-memory store keys."""
    import hashlib
    import json

    payload = json.dumps({"p": preprocessing.to_dict(), "a": augment}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class EvalImages:
    """The evaluation view of a fixed list of images, as batches, re-iterable (one pass per epoch).

    The first pass decodes (one batch ahead, in a thread) and keeps each decoded image in the
    in-memory store; later passes, validation every epoch, read them from memory.

    >>> for batch in EvalImages(paths, digests, backbone.preprocessing, batch_size=64): ...
    """

    def __init__(self, paths: Sequence[Path], digests: Sequence[str], preprocessing: Any, *, batch_size: int, device: torch.device | None = None) -> None:

        self.paths = list(paths)
        view = preprocessing_id(preprocessing)
        self.keys = [f"{digest}.{view}" for digest in digests]
        self.transform = build_transforms(preprocessing)
        self.batch_size = batch_size
        self.device = device
        self.min_size = preprocessing.resize_size

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return image_batches(self.paths, self.transform, batch_size=self.batch_size, keys=self.keys, device=self.device,
                             min_size=self.min_size)


def eval_view_check(preprocessing: Any, store: DecodedImages | None = DECODED) -> Callable[[bytes, str, str], None]:
    """An image check (`graft.input.data.verify_images`) that is also the first decode of the run.

    Each file is decoded at the size `preprocessing` resizes to, and its evaluation view (resized,
    cropped uint8 pixels, what `image_batches` would compute) is kept in `store` under the key
    extraction and validation look up, while the store has room: the run's first pass over those
    images then decodes nothing. Past the store's budget the check still decodes at the model's
    size and the pass decodes such an image again.
    """
    split = split_transform(build_transforms(preprocessing))
    view, min_size = preprocessing_id(preprocessing), preprocessing.resize_size

    def check(data: bytes, name: str, digest: str) -> None:
        keep_gray = split is not None and split.channel_blind
        image = load_image(data, name=name, keep_gray=keep_gray, min_size=min_size)
        if split is not None and store is not None and store.used_bytes < store.budget_bytes:
            store.put(f"{digest}.{view}", split.pixels(image))

    return check
