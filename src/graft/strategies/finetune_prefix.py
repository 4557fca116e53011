"""Fine-tuning on the cached outputs of a frozen prefix: when the stages that train are the last
ones and none thaws later, the frozen prefix runs once per image (and per augmented view, cached on
disk like features) and each epoch trains only the suffix and the head on its outputs. One training
phase "finetune" (`graft.training.run_phase`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from graft.models.model import GraftModel
from graft.models.prefix import Chain, sequential_chain, split_index
from graft.speed.folding import inference_network
from graft.speed.numerics import autocast
from graft.strategies.base import TrainContext, TrainOutcome
from graft.strategies.finetune_images import training_compiler
from graft.strategies.plan import StagePlan, apply_trainability, param_groups
from graft.training import Phase, run_phase
from graft.training.features import ExtractionStats, FeatureCache, backbone_key, extract_features
from graft.training.loop import TrainSteps, make_optimizer, view_batches, warmup_cosine_schedule

# Augmented views cached per training image when only a suffix trains on cached activations
# (the prefix's output cannot be re-augmented each epoch, so a few fixed views stand in).
DEFAULT_PREFIX_VIEWS = 4


def cached_prefix_split(backbone: nn.Module, plan: StagePlan, context: TrainContext, epochs: int) -> tuple[Chain, Chain] | None:
    """(frozen prefix, trainable suffix) of `backbone` when the prefix stays frozen all run and can be cut off."""

    trains = plan.trainable_at(epochs)
    if plan.train_bn or not any(trains) or all(trains):
        return None
    first = trains.index(True)
    if not all(trains[first:]) or plan.thaw_epoch[first] != 0:
        return None  # a stage thaws during the run: the prefix changes, nothing to cache
    chain = sequential_chain(backbone, context.backbone.preprocessing.input_size)
    if chain is None:
        return None
    position = split_index(chain, context.stages, first)
    if position is None or position == 0:
        return None
    return Chain(chain[:position]), Chain(chain[position:])


def train_on_cached_prefix(model: GraftModel, plan: StagePlan, context: TrainContext, split, *, epochs: int, patience: int, notes: dict) -> TrainOutcome:
    """Train the suffix + head on the frozen prefix's cached outputs (with augmented views)."""
    prefix, suffix = split
    train_views, val_inputs, prefix_notes = prefix_outputs(context, prefix, suffix)
    phase = prefix_phase(model, nn.Sequential(suffix, model.head), plan, context, (train_views, val_inputs), epochs=epochs, patience=patience)
    outcome = run_phase(phase, context)  # the validation logits on the device the suffix trained on
    model.cpu()
    return TrainOutcome(model=model, fit=outcome.fit, val_logits=outcome.val_logits, notes={**notes, **outcome.notes, **prefix_notes})


def prefix_outputs(context: TrainContext, prefix: Chain, suffix: Chain) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The prefix's outputs: training ones (views, N, ...; view 0 plain), validation ones, and notes."""

    config, backbone = context.config, context.backbone
    views = DEFAULT_PREFIX_VIEWS if config.augment_views is None else config.augment_views
    part = f"prefix:{prefix.names[-1]}"
    cache = FeatureCache(context.cache.root, backbone_key(backbone, backbone.preprocessing, context.precision, part)) if context.cache else None
    stats = ExtractionStats()

    def activations(paths, digests, augment, view, what):
        with context.reporter.progress(f"frozen prefix ({what})", len(paths)) as advance:
            return extract_features(
                backbone, paths, digests, cache=cache, precision=context.precision, device=context.device,
                augment=augment, view=view, seed=config.seed, progress=advance, stats=stats, model=prefix,
                compile=context.compile_backbone,
            )

    kept = 0
    tap = context.tap
    if cache is not None and tap is not None and tap.module_name == prefix.names[-1]:
        # The prefix's outputs for the plain view, kept from an earlier full pass (auto's
        # framing, lp-ft's probe): through the cache, the passes below find them there.
        kept = len(tap.outputs)
        cache.put({key: output.float() for key, output in tap.outputs.items()})
        tap.outputs.clear()
    train, val = context.dataset.train, context.dataset.val
    train_views = [activations(train.paths, train.digests, "none", 0, "training")]
    for view in range(1, views + 1):
        train_views.append(activations(train.paths, train.digests, config.augment, view, f"augmented view {view}"))
    stacked = torch.stack(train_views)
    val_inputs = activations(val.paths, val.digests, "none", 0, "validation")
    context.reporter.say(
        f"training {', '.join(suffix.names)} + head on cached outputs of the frozen prefix "
        f"(up to {prefix.names[-1]}; {stats.computed} computed, {stats.from_cache} from the cache, {views} augmented views)"
    )
    return stacked, val_inputs, {"cached_prefix": prefix.names[-1], "augment_views": views, "features_computed": stats.computed,
                                 "features_from_cache": stats.from_cache, "prefix_outputs_kept": kept}


def prefix_phase(model: GraftModel, trainable: nn.Module, plan: StagePlan, context: TrainContext,
                 inputs: tuple[torch.Tensor, torch.Tensor], *, epochs: int, patience: int) -> Phase:
    """The phase "finetune" of `trainable` (suffix + head) over the cached prefix outputs."""
    config, device = context.config, context.device
    train_views, val_inputs = inputs
    trainable.to(device)
    apply_trainability(model, context.stages, plan.trainable_at(0), plan)
    optimizer = make_optimizer(param_groups(model, context.stages, plan, config.weight_decay), device)
    steps_per_epoch = math.ceil(train_views.shape[1] / config.batch_size)
    scheduler = warmup_cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=config.warmup_epochs)
    labels = torch.tensor(context.dataset.train.labels)
    loss_fn = context.task.training_loss(labels, context.head_spec.num_classes, config).to(device)
    generator = torch.Generator().manual_seed(config.seed)

    def before_epoch(epoch: int) -> None:
        apply_trainability(model, context.stages, plan.trainable_at(epoch), plan)

    def steps(epochs_left: int) -> TrainSteps:
        return TrainSteps(trainable, loss_fn, optimizer, scheduler, precision=context.precision, device=device,
                          compiler=training_compiler(context, epochs_left * steps_per_epoch), task=context.task)

    def predict() -> torch.Tensor:
        trainable.eval()
        # In fp32 with BatchNorm folded: one copy per epoch's weights (`folding.inference_network`).
        network = inference_network(trainable, tuple(val_inputs.shape[1:]), context.precision)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(val_inputs), 256):
                batch = val_inputs[start : start + 256].to(device).contiguous(memory_format=torch.channels_last)
                with autocast(context.precision, device):
                    outputs.append(network(batch).float().cpu())
        return torch.cat(outputs)

    return Phase(
        name="finetune", title=f"{config.strategy} epochs", model=model, optimizer=optimizer, scheduler=scheduler,
        generator=generator, epochs=epochs, patience=patience,
        batches=lambda epoch: view_batches(train_views, labels, config.batch_size, generator), steps=steps,
        predict=predict, val_labels=torch.tensor(context.dataset.val.labels), task=context.task, before_epoch=before_epoch,
        start_is_candidate=plan.start_is_candidate,
    )
