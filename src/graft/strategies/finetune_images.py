"""Fine-tuning on the images: every epoch decodes and augments the training images and runs the
whole backbone, the stages of the `StagePlan` trainable as it says (`gradual` thaws them over the
epochs). One training phase "finetune" (`graft.training.run_phase`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from graft.input.images import load_image
from graft.input.pipeline import EvalImages, SplitTransform, default_batch_size, split_transform
from graft.input.preprocessing import build_transforms
from graft.models.model import GraftModel
from graft.models.stages import Stage
from graft.speed.compiling import TrainingCompiler
from graft.speed.folding import inference_network
from graft.speed.numerics import autocast
from graft.strategies.base import TrainContext, TrainOutcome
from graft.strategies.plan import StagePlan, apply_trainability, param_groups
from graft.training import Phase, run_phase
from graft.training import distributed
from graft.training.loop import TrainSteps, make_optimizer, warmup_cosine_schedule


def train_on_images(
    model: GraftModel, plan: StagePlan, context: TrainContext, *, epochs: int, patience: int, notes: dict,
    stages: list[Stage] | None = None,
) -> TrainOutcome:
    """Train `model` on the images by `plan`; keep the best epoch; return its validation logits."""
    phase = image_phase(model, plan, context, stages or context.stages, epochs=epochs, patience=patience)
    outcome = run_phase(phase, context)
    model.cpu()
    return TrainOutcome(model=model, fit=outcome.fit, val_logits=outcome.val_logits, notes={**notes, **outcome.notes})


def image_phase(model: GraftModel, plan: StagePlan, context: TrainContext, stages: list[Stage], *, epochs: int, patience: int) -> Phase:
    """The phase "finetune" on images: the optimizer over the plan's groups, the thaw events, and
    the trainable stages reached kept in the checkpoint."""
    config, device = context.config, context.device
    generator = torch.Generator().manual_seed(config.seed)
    # Under torchrun each rank trains on its share of every epoch (gradients averaged by DDP).
    sampler = DistributedSampler(range(len(context.dataset.train)), num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=True, seed=config.seed) if distributed.active() else None
    train = context.dataset.train
    train_loader, prepare = training_loader(
        train.paths, torch.tensor(train.labels), context.backbone.preprocessing, augment=config.augment,
        batch_size=config.batch_size, device=device, generator=generator, sampler=sampler,
    )
    model.to(device).to(memory_format=torch.channels_last)
    apply_trainability(model, stages, plan.trainable_at(0), plan)
    optimizer = make_optimizer(param_groups(model, stages, plan, config.weight_decay), device)
    scheduler = warmup_cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=len(train_loader), warmup_epochs=config.warmup_epochs)
    loss_fn = context.task.training_loss(torch.tensor(train.labels), context.head_spec.num_classes, config).to(device)
    thaw = ThawEvents(model, stages, plan, context, sampler)

    def steps(epochs_left: int) -> TrainSteps:
        compiler = training_compiler(context, epochs_left * len(train_loader))
        thaw.steps = TrainSteps(thaw.network, loss_fn, optimizer, scheduler, precision=context.precision, device=device,
                                prepare=prepare, compiler=compiler, task=context.task)
        return thaw.steps

    return Phase(
        name="finetune", title=f"{config.strategy} epochs", model=model, optimizer=optimizer, scheduler=scheduler,
        generator=generator, epochs=epochs, patience=patience, batches=lambda epoch: train_loader, steps=steps,
        predict=validation_logits(model, context, thaw.restore), val_labels=torch.tensor(context.dataset.val.labels), task=context.task,
        before_epoch=thaw.before_epoch,
        # Reading the loss back is free on a CPU; on a GPU it would stall the queue every step.
        batch_status=lambda loss: f"batch loss {loss.item():.3f}" if device.type == "cpu" else None,
        saved_extra=lambda: {"trainable_stages": thaw.current}, restore_extra=thaw.resume,
        start_is_candidate=plan.start_is_candidate,
    )


class ThawEvents:
    """The stages trainable now; thaws the plan's next ones at the start of an epoch."""

    def __init__(self, model: GraftModel, stages: list[Stage], plan: StagePlan, context: TrainContext, sampler) -> None:
        self.model, self.stages, self.plan, self.context, self.sampler = model, stages, plan, context, sampler
        self.current = plan.trainable_at(0)
        self.network = distributed.wrap(model, context.device)
        self.steps: TrainSteps | None = None

    def before_epoch(self, epoch: int) -> str | None:
        wanted = self.plan.trainable_at(epoch)
        thawed = [self.stages[i].name for i, (now, was) in enumerate(zip(wanted, self.current)) if now and not was]
        self.current = wanted
        self.restore()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if not thawed:
            return None
        self.network = distributed.wrap(self.model, self.context.device)  # DDP registers the trainable parameters anew
        if self.steps is not None:
            self.steps.network = self.network
        self.context.reporter.say(f"epoch {epoch + 1}: thawed {', '.join(thawed)}")
        return "thawed " + ", ".join(thawed)

    def restore(self) -> None:
        """Trainability as the stages reached say (after validation put the model in eval mode)."""
        apply_trainability(self.model, self.stages, self.current, self.plan)

    def resume(self, extra: dict) -> None:
        if "trainable_stages" in extra:
            self.current = [bool(t) for t in extra["trainable_stages"]]  # the thaw stage reached
            self.restore()


def validation_logits(model: GraftModel, context: TrainContext, after: Callable[[], None]) -> Callable[[], torch.Tensor]:
    """The validation images' logits, this rank's share gathered back into file order; `after`
    runs when the model was training (its trainability is set again)."""
    val_set, device, precision = context.dataset.val, context.device, context.precision
    # Each rank validates its strided share; the logits are gathered back into file order.
    val_local = distributed.shard(range(len(val_set)))
    # Validation images are decoded once and kept in memory: every later epoch reads them from there.
    val_loader = EvalImages([val_set.paths[i] for i in val_local], [val_set.digests[i] for i in val_local], context.backbone.preprocessing,
                            batch_size=max(default_batch_size(device), context.config.batch_size), device=device)

    def predict() -> torch.Tensor:
        was_training = model.training
        model.eval()
        # In fp32 with BatchNorm folded: one copy per epoch's weights (`folding.inference_network`).
        network = inference_network(model, context.backbone.preprocessing.input_size, precision)
        outputs = []
        with torch.inference_mode():
            for images in val_loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with autocast(precision, device):
                    outputs.append(network(images).float().cpu())
        if was_training:
            after()
        local = torch.cat(outputs) if outputs else torch.empty(0, context.head_spec.num_classes)
        if not distributed.active():
            return local
        rows = distributed.gather_shards(dict(zip(val_local, local)))
        return torch.stack([rows[i] for i in range(len(val_set))])

    return predict


class LabelledImageFiles(Dataset):
    """(image, label) pairs from files through `transform`; with `split`, the image comes as the
    uint8 (H, W, 3) pixels of the transform's PIL part, to be normalised on the device.

    `min_size` decodes large pictures at the size the model needs (`load_image(min_size=...)`):
    with `REDUCING_GAP` 2 their short side stays at least twice the resize, so even the smallest
    random crop of the augmentations (a third of the area) is still larger than the model's input.
    """

    def __init__(self, paths, labels, transform, split: SplitTransform | None = None, min_size: int | None = None) -> None:
        self.paths, self.labels, self.transform, self.split = list(paths), list(labels), transform, split
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(self.paths[index], min_size=self.min_size)
        return (self.split.pixels(image) if self.split else self.transform(image)), self.labels[index]


def training_loader(
    paths, labels, preprocessing, *, augment: str, batch_size: int, device: torch.device,
    generator: torch.Generator, sampler=None, drop_last: bool = False,
) -> tuple[DataLoader, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The training images' DataLoader, and what the step must run on each batch on the device.

    On a GPU, worker processes (`training_workers`) send uint8 pixels into pinned memory and the
    GPU normalises them (`SplitTransform.normalizer_on`): a quarter of the bytes through
    the processes' shared memory and the host-to-device copy, and no float pass on the CPU. On a
    CPU the workers send normalised float batches, which keeps that pass off the model's cores.
    """
    transform = build_transforms(preprocessing, augment=augment)
    split = split_transform(transform) if device.type == "cuda" else None
    workers = training_workers(len(paths), device)
    loader = DataLoader(
        LabelledImageFiles(paths, labels, transform, split, preprocessing.resize_size), sampler=sampler,
        batch_size=batch_size, shuffle=sampler is None, generator=generator, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker, drop_last=drop_last,
    )
    return loader, (split.normalizer_on(device) if split else None)


def training_compiler(context: TrainContext, total_steps: int) -> TrainingCompiler:
    """The run's `--compile` setting applied to its training steps (`graft.speed.compiling`)."""
    return TrainingCompiler(context.config.compile, context.device, total_steps, say=context.reporter.say)


def training_workers(count: int, device: torch.device) -> int:
    """DataLoader processes that decode and augment training images.

    0 (no processes) for fewer than 64 images (starting processes costs more). On a CPU the model needs the
    cores, so at most 4 (1 on 2 cores). On a GPU the cores have nothing else to do and the GPU
    waits on them, so all but one, up to 16.
    """
    import os

    if count < 64:
        return 0
    cores = os.cpu_count() or 2
    return max(1, min(16 if device.type == "cuda" else 4, cores - 1))


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
