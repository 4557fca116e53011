"""Fine-tuning strategies: `partial`, `full`, `discriminative`, `gradual`, `lp-ft`.

They differ only in data: which stages train from which epoch, and at which learning rate.
`StagePlan` holds that; `FineTune.train` runs the one image-training loop over it.

Rules every plan obeys:
- a frozen stage has `requires_grad=False` and its BatchNorm layers run in eval mode, so neither
  its weights nor its running statistics move (`--train-bn` lets the BN affine parameters of frozen
  stages train, statistics still frozen); autograd builds no graph through a frozen prefix, so
  there is no backward through it;
- the head trains at `lr`; backbone stage i of n trains at `lr * lr_decay ** (n - i)` when
  discriminative (each stage `lr_decay` times the next one's, going toward the input);
- a stage that thaws later joins the optimizer without resetting the others' state (every group is
  in the optimizer from the start; a parameter without gradient is skipped by AdamW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from graft import distributed

from graft.checkpoint import start_phase
from graft.compiling import TrainingCompiler
from graft.config import TrainConfig
from graft.errors import ConfigError
from graft.folding import inference_network
from graft.heads import make_head
from graft.images import load_image
from graft.loop import TrainSteps, evaluate_logits, fit, make_optimizer, view_batches, warmup_cosine_schedule
from graft.model import GraftModel
from graft.numerics import autocast
from graft.pipeline import EvalImages, SplitTransform, default_batch_size, split_transform
from graft.preprocessing import build_transforms
from graft.prefix import Chain
from graft.stages import Stage
from graft.strategies.base import AuditRow, TrainContext, TrainOutcome, has_batchnorm, with_prefix_tap


# Augmented views cached per training image when only a suffix trains on cached activations
# (the prefix's output cannot be re-augmented each epoch, so a few fixed views stand in).
DEFAULT_PREFIX_VIEWS = 4


@dataclass
class StagePlan:
    """What trains: per backbone stage, its learning rate and the epoch it thaws (None: never)."""

    stage_lrs: list[float]
    thaw_epoch: list[int | None]
    head_lr: float
    train_bn: bool = False
    adapter_lr: float | None = None  # LoRA: adapters train at this rate, their base layers frozen
    bn_stats: str = "update"  # BatchNorm of trainable stages: "update" (train mode) or "frozen" (eval mode)
    notes: dict[str, object] = field(default_factory=dict)
    # The model training starts from is already fitted (lp-ft's probe head): it competes with the
    # epochs on validation, and fine-tuning is kept only where an epoch beats it.
    start_is_candidate: bool = False

    def trainable_at(self, epoch: int) -> list[bool]:
        return [t is not None and t <= epoch for t in self.thaw_epoch]


class FineTune:
    """Base of the image-training strategies; subclasses choose the plan."""

    name = "fine-tune"
    default_epochs = 10
    default_lr = 1e-3
    default_patience = 4

    def plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        raise NotImplementedError

    def full_plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        """The strategy's plan with the run's BatchNorm statistics policy (`--bn-stats`)."""
        plan = self.plan(stages, config)
        plan.bn_stats = config.bn_stats
        return plan

    def audit(self, backbone: nn.Module, stages: list[Stage], head: nn.Module, config: TrainConfig) -> list[AuditRow]:
        plan = self.full_plan(stages, config)
        final = plan.trainable_at(10**9)
        rows = []
        for stage, trains, lr, thaw in zip(stages, final, plan.stage_lrs, plan.thaw_epoch):
            bn = "-"
            if has_batchnorm(backbone, stage):
                # "auto" is only left unresolved where no data was seen (graft inspect).
                bn = {"update": "train", "frozen": "eval", "auto": "auto"}[plan.bn_stats] if trains else "eval"
            trainable = stage.num_params if trains else (_bn_affine_count(backbone, stage) if plan.train_bn else 0)
            label = stage.name if not thaw else f"{stage.name} (from epoch {thaw + 1})"
            rows.append(AuditRow(label, trainable, stage.num_params, lr if trains or plan.train_bn else None, bn))
        head_params = sum(p.numel() for p in head.parameters())
        rows.append(AuditRow("head", head_params, head_params, plan.head_lr, "-"))
        return rows

    def train(self, context: TrainContext) -> TrainOutcome:
        config = context.config
        plan = self.full_plan(context.stages, config)
        epochs = config.epochs or self.default_epochs
        patience = config.patience or self.default_patience
        split = cached_prefix_split(context.backbone.model, plan, context, epochs)
        if split is not None:
            # Found before the head: lp-ft's probe makes a full pass over the plain view, which
            # then keeps the prefix's outputs too.
            context = with_prefix_tap(context, split[0].names[-1])
        head = self.initial_head(context)
        model = GraftModel(context.backbone.model, head)
        if split is not None:
            return train_on_cached_prefix(model, plan, context, split, epochs=epochs, patience=patience, notes=plan.notes)
        return train_on_images(model, plan, context, epochs=epochs, patience=patience, notes=plan.notes)

    def initial_head(self, context: TrainContext) -> nn.Module:
        return make_head(context.head_spec)


class Partial(FineTune):
    """The last `--train-stages K` stages train (discriminative rates among them); the rest is frozen."""

    name = "partial"

    def plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        n = len(stages)
        k = trained_stage_count(config, n, default=1)
        lr = config.lr or self.default_lr
        return StagePlan(
            stage_lrs=[lr * config.lr_decay ** (n - i) for i in range(n)],
            thaw_epoch=[0 if i >= n - k else None for i in range(n)],
            head_lr=lr, train_bn=config.train_bn,
        )


def trained_stage_count(config: TrainConfig, n: int, *, default: int) -> int:
    """`--train-stages K` checked against the backbone's `n` stages; the strategy's default if unset."""
    k = default if config.train_stages is None else config.train_stages
    if not 1 <= k <= n:
        raise ConfigError(f"--train-stages: expected 1 to {n} (the backbone has {n} stages), got {k}")
    return k


class Full(FineTune):
    """Everything trains at one learning rate: the textbook baseline, done with frozen nothing."""

    name = "full"
    default_lr = 1e-4

    def plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        lr = config.lr or self.default_lr
        return StagePlan(stage_lrs=[lr] * len(stages), thaw_epoch=[0] * len(stages), head_lr=lr)


class Discriminative(FineTune):
    """Everything trains; each earlier stage's rate is `--lr-decay` times the next one's."""

    name = "discriminative"

    def plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        n = len(stages)
        lr = config.lr or self.default_lr
        return StagePlan(
            stage_lrs=[lr * config.lr_decay ** (n - i) for i in range(n)],
            thaw_epoch=[0] * n, head_lr=lr,
        )


class Gradual(FineTune):
    """The head first, then one more stage (from the top) thawed every `--thaw-every` epochs."""

    name = "gradual"

    def plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        n = len(stages)
        lr = config.lr or self.default_lr
        every = config.thaw_every
        return StagePlan(
            stage_lrs=[lr * config.lr_decay ** (n - i) for i in range(n)],
            thaw_epoch=[every * (n - i) for i in range(n)],
            head_lr=lr, train_bn=config.train_bn,
        )


class LinearProbeThenFineTune(FineTune):
    """`lp-ft`: a linear probe on cached features first, then everything (or the last
    `--train-stages K`) fine-tunes from that head at a tenth of the rate (discriminative), so the
    new head does not wreck the features early. The probe trains to its own budget (the
    feature-extract defaults; `--epochs` counts fine-tuning epochs), and it stays a candidate: if
    no fine-tuning epoch beats it on validation, the run returns the probe (`starting_point`)."""

    name = "lp-ft"
    # Fine-tuning at 3e-4 (a tenth of this) for the top stage and the head, decaying toward the
    # input. Measured on 20-shot Fashion-MNIST with this rate (whole frame, frozen BN statistics,
    # strong augmentation, --lr-decay 0.5, 12 epochs): 0.818 and 0.811 test accuracy in two runs,
    # the best of every strategy tried. The default decay (0.3) with this rate was not measured.
    default_lr = 3e-3

    def plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        n = len(stages)
        k = trained_stage_count(config, n, default=n)
        lr = (config.lr or self.default_lr) * 0.1
        return StagePlan(
            stage_lrs=[lr * config.lr_decay ** (n - 1 - i) for i in range(n)],
            thaw_epoch=[0 if i >= n - k else None for i in range(n)], head_lr=lr, start_is_candidate=True,
        )

    def train(self, context: TrainContext) -> TrainOutcome:
        outcome = super().train(context)
        outcome.notes["probe_epochs_run"] = len(self.probe_history)  # metrics.json: the probe's own budget at work
        return outcome

    def initial_head(self, context: TrainContext) -> nn.Module:
        from graft.strategies.feature_extract import FeatureExtract

        # The probe trains on the plain features (the ones a feature-extract run or auto's
        # measurement has cached already), while `--augment-views` sets the augmented views of the
        # fine-tuning phase; and to the probe's own budget of epochs, since `--epochs` and
        # `--patience` are the fine-tuning's (head epochs on cached features are nearly free).
        probe = FeatureExtract()
        probe_config = context.config.replace(augment_views=0, epochs=None, patience=None)
        outcome = probe.train(TrainContext(**{**context.__dict__, "config": probe_config}))
        for parameter in context.backbone.model.parameters():
            parameter.requires_grad_(True)
        self.probe_history = outcome.fit.history
        context.reporter.say(f"lp-ft: linear probe done (val accuracy {outcome.fit.best_val_accuracy:.3f}); fine-tuning from its head")
        return outcome.model.head


class Lora(FineTune):
    """Low-rank adapters (peft LoRA, `--lora-rank`) on every linear layer and ungrouped convolution;
    the base weights and every BatchNorm stay frozen; the head trains fully. For large backbones."""

    name = "lora"
    default_lr = 1e-3

    def plan(self, stages: list[Stage], config: TrainConfig) -> StagePlan:
        lr = config.lr or self.default_lr
        return StagePlan(stage_lrs=[lr] * len(stages), thaw_epoch=[None] * len(stages), head_lr=lr, adapter_lr=lr,
                         notes={"lora_rank": config.lora_rank})

    def audit(self, backbone: nn.Module, stages: list[Stage], head: nn.Module, config: TrainConfig) -> list[AuditRow]:
        from graft.lora import lora_targets

        modules = dict(backbone.named_modules())
        lr = config.lr or self.default_lr
        rows = []
        for stage in stages:
            adapters = sum(
                _lora_size(modules[name], config.lora_rank) for name in lora_targets(backbone)
                if any(name == m or name.startswith(m + ".") for m in stage.module_names)
            )
            bn = "eval" if has_batchnorm(backbone, stage) else "-"
            rows.append(AuditRow(f"{stage.name} (LoRA)", adapters, stage.num_params + adapters, lr if adapters else None, bn))
        head_params = sum(p.numel() for p in head.parameters())
        rows.append(AuditRow("head", head_params, head_params, lr, "-"))
        return rows

    def train(self, context: TrainContext) -> TrainOutcome:
        from graft.lora import apply_lora, lora_targets
        from graft.stages import discover_stages

        config = context.config
        model = GraftModel(context.backbone.model, self.initial_head(context))
        spec = apply_lora(model, rank=config.lora_rank, alpha=float(config.lora_rank), target_modules=lora_targets(model.backbone))
        stages = discover_stages(model.backbone)  # parameter names changed: base_layer, lora_A, lora_B
        plan = self.full_plan(stages, config)
        outcome = train_on_images(model, plan, context, epochs=config.epochs or self.default_epochs,
                                  patience=config.patience or self.default_patience, notes=plan.notes, stages=stages)
        outcome.adapters = spec
        return outcome


def _lora_size(module: nn.Module, rank: int) -> int:
    if isinstance(module, nn.Linear):
        return rank * (module.in_features + module.out_features)
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return rank * (module.in_channels * k + module.out_channels)
    return 0


def starting_point(plan: StagePlan, model: nn.Module, validate: Callable[[], tuple[float, float]], checkpoint) -> dict:
    """`fit`'s keyword arguments: a resumed run's, or for a plan whose starting model is already
    fitted (`start_is_candidate`), that model as epoch -1 with its validation score, so that the
    best epoch is chosen among it too. Fine-tuning that never beats the probe it started from on
    validation gives the probe back instead of a worse model (one validation pass)."""
    if checkpoint.fit_kwargs or not plan.start_is_candidate:
        return checkpoint.fit_kwargs
    val_loss, val_accuracy = validate()
    plan.notes["start_val_accuracy"] = round(val_accuracy, 6)  # the run's metrics show what it had to beat
    return {"best": (-1, val_accuracy, val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()})}


# --- training on cached prefix activations ----------------------------------------------------------


def cached_prefix_split(backbone: nn.Module, plan: StagePlan, context: TrainContext, epochs: int) -> tuple[Chain, Chain] | None:
    """(frozen prefix, trainable suffix) of `backbone` when the prefix stays frozen all run and can be cut off."""
    from graft.prefix import Chain, sequential_chain, split_index

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
    from graft.features import ExtractionStats, FeatureCache, backbone_key, extract_features
    from graft.strategies.feature_extract import class_weights

    prefix, suffix = split
    config, device = context.config, context.device
    backbone = context.backbone
    views = DEFAULT_PREFIX_VIEWS if config.augment_views is None else config.augment_views
    part = f"prefix:{prefix.names[-1]}"
    cache = FeatureCache(context.cache.root, backbone_key(backbone, backbone.preprocessing, context.precision, part)) if context.cache else None
    stats = ExtractionStats()

    def activations(paths, digests, augment, view, what):
        with context.reporter.progress(f"frozen prefix ({what})", len(paths)) as advance:
            return extract_features(
                backbone, paths, digests, cache=cache, precision=context.precision, device=device,
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
    trainable = nn.Sequential(suffix, model.head).to(device)
    apply_trainability(model, context.stages, plan.trainable_at(0), plan)
    optimizer = make_optimizer(param_groups(model, context.stages, plan, config.weight_decay), device)
    count = len(train)
    steps_per_epoch = math.ceil(count / config.batch_size)
    scheduler = warmup_cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=config.warmup_epochs)
    labels = torch.tensor(train.labels)
    weights = class_weights(labels, context.head_spec.num_classes, config.class_weighting)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    val_labels = torch.tensor(val.labels)
    generator = torch.Generator().manual_seed(config.seed)
    compiler = training_compiler(context, epochs * steps_per_epoch)
    step = TrainSteps(trainable, loss_fn.to(device), optimizer, scheduler, precision=context.precision, device=device, compiler=compiler)

    def train_epoch(epoch: int) -> tuple[float, float]:
        apply_trainability(model, context.stages, plan.trainable_at(epoch), plan)
        for inputs, targets in view_batches(stacked, labels, config.batch_size, generator):
            step(inputs, targets)
        return step.epoch_result()

    def predict_logits() -> torch.Tensor:
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

    def validate() -> tuple[float, float]:
        return evaluate_logits(predict_logits(), val_labels, nn.CrossEntropyLoss())

    checkpoint = start_phase(context, "finetune", model=model, optimizer=optimizer, scheduler=scheduler, generators={"batches": generator})
    with context.reporter.progress(f"{config.strategy} epochs", epochs) as advance:
        advance(checkpoint.start_epoch)

        def on_epoch(record, improved, state) -> None:
            context.on_epoch(state.history)
            checkpoint.save(state)
            advance(1, status=f"loss {record.train_loss:.3f} val acc {record.val_accuracy:.3f}")

        result = fit(model=model, optimizer=optimizer, train_epoch=train_epoch, validate=validate,
                     epochs=epochs, patience=patience, on_epoch=on_epoch, **starting_point(plan, model, validate, checkpoint))
    model.load_state_dict(result.best_state)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    val_logits = predict_logits()  # on the device the suffix trained on, then the model leaves it
    model.cpu()
    return TrainOutcome(model=model, fit=result, val_logits=val_logits, notes={
        **notes, "cached_prefix": prefix.names[-1], "augment_views": views, "training_compile": compiler.decision.to_dict(),
        "features_computed": stats.computed, "features_from_cache": stats.from_cache, "prefix_outputs_kept": kept,
    })


# --- the image-training loop -----------------------------------------------------------------------


class LabelledImageFiles(Dataset):
    """(image, label) pairs from files through `transform`; with `split`, the image comes as the
    uint8 (H, W, 3) pixels of the transform's PIL part, to be normalised on the device."""

    def __init__(self, paths, labels, transform, split: SplitTransform | None = None) -> None:
        self.paths, self.labels, self.transform, self.split = list(paths), list(labels), transform, split

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(self.paths[index])
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
        LabelledImageFiles(paths, labels, transform, split), sampler=sampler,
        batch_size=batch_size, shuffle=sampler is None, generator=generator, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker, drop_last=drop_last,
    )
    return loader, (split.normalizer_on(device) if split else None)


def apply_trainability(model: GraftModel, stages: list[Stage], trainable: list[bool], plan: StagePlan) -> None:
    """Set requires_grad per stage; BatchNorm of frozen stages (and of every stage when the plan
    freezes BN statistics) runs in eval mode, so its running statistics never move."""
    from graft.lora import is_adapter_parameter

    adapters = plan.adapter_lr is not None
    modules = dict(model.backbone.named_modules())
    params = dict(model.backbone.named_parameters())
    model.train()
    for stage, trains in zip(stages, trainable):
        for name in stage.param_names:
            params[name].requires_grad_(trains or (adapters and is_adapter_parameter(name)))
        if trains and plan.bn_stats != "frozen":
            continue
        for module_name in stage.module_names:
            for sub in modules[module_name].modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.eval()  # statistics frozen, whatever model.train() said
                    if not trains and plan.train_bn and sub.affine:
                        sub.weight.requires_grad_(True)
                        sub.bias.requires_grad_(True)
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)


def param_groups(model: GraftModel, stages: list[Stage], plan: StagePlan, weight_decay: float) -> list[dict]:
    """One optimizer group per stage that ever trains (or has BN to train), plus the head."""
    from graft.lora import is_adapter_parameter

    params = dict(model.backbone.named_parameters())
    groups = []
    if plan.adapter_lr is not None:
        adapters = [p for n, p in params.items() if is_adapter_parameter(n)]
        groups.append({"params": adapters, "lr": plan.adapter_lr, "weight_decay": weight_decay, "name": "adapters"})
    final = plan.trainable_at(10**9)
    for stage, lr, trains in zip(stages, plan.stage_lrs, final):
        if trains or plan.train_bn:
            groups.append({"params": [params[n] for n in stage.param_names], "lr": lr, "weight_decay": weight_decay, "name": stage.name})
    groups.append({"params": list(model.head.parameters()), "lr": plan.head_lr, "weight_decay": weight_decay, "name": "head"})
    return groups


def train_on_images(
    model: GraftModel, plan: StagePlan, context: TrainContext, *, epochs: int, patience: int, notes: dict,
    stages: list[Stage] | None = None,
) -> TrainOutcome:
    """Train `model` on the images by `plan`; keep the best epoch; return its validation logits."""
    from graft.strategies.feature_extract import class_weights

    config = context.config
    device, precision = context.device, context.precision
    stages = stages or context.stages
    train_set = context.dataset.train
    val_set = context.dataset.val
    generator = torch.Generator().manual_seed(config.seed)
    # Under torchrun each rank trains on its share of every epoch (gradients averaged by DDP).
    sampler = DistributedSampler(range(len(train_set)), num_replicas=distributed.world_size(), rank=distributed.rank(), shuffle=True, seed=config.seed) if distributed.active() else None
    train_loader, prepare = training_loader(
        train_set.paths, train_set.labels, context.backbone.preprocessing, augment=config.augment,
        batch_size=config.batch_size, device=device, generator=generator, sampler=sampler,
    )
    # Each rank validates its strided share; the logits are gathered back into file order.
    val_local = distributed.shard(range(len(val_set)))
    # Validation images are decoded once and kept in memory: every later epoch reads them from there.
    val_loader = EvalImages([val_set.paths[i] for i in val_local], [val_set.digests[i] for i in val_local], context.backbone.preprocessing,
                            batch_size=max(default_batch_size(device), config.batch_size), device=device)
    model.to(device).to(memory_format=torch.channels_last)
    apply_trainability(model, stages, plan.trainable_at(0), plan)
    optimizer = make_optimizer(param_groups(model, stages, plan, config.weight_decay), device)
    scheduler = warmup_cosine_schedule(optimizer, epochs=epochs, steps_per_epoch=len(train_loader), warmup_epochs=config.warmup_epochs)
    weights = class_weights(torch.tensor(train_set.labels), context.head_spec.num_classes, config.class_weighting)
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None, label_smoothing=config.label_smoothing)
    val_loss_fn = nn.CrossEntropyLoss()
    val_labels = torch.tensor(val_set.labels)
    current = plan.trainable_at(0)
    network = distributed.wrap(model, device)

    def before_epoch(epoch: int) -> str | None:
        nonlocal current, network
        wanted = plan.trainable_at(epoch)
        thawed = [stages[i].name for i, (now, was) in enumerate(zip(wanted, current)) if now and not was]
        current = wanted
        apply_trainability(model, stages, wanted, plan)
        if sampler is not None:
            sampler.set_epoch(epoch)
        if thawed:
            network = distributed.wrap(model, device)  # DDP registers the trainable parameters anew
            context.reporter.say(f"epoch {epoch + 1}: thawed {', '.join(thawed)}")
            return "thawed " + ", ".join(thawed)
        return None

    def train_epoch(epoch: int) -> tuple[float, float]:
        step = TrainSteps(network, loss_fn, optimizer, scheduler, precision=precision, device=device, prepare=prepare, compiler=compiler)
        for images, labels in train_loader:
            loss = step(images, labels)
            # Reading the loss back is free on a CPU; on a GPU it would stall the queue every step.
            advance(0, status=f"batch loss {loss.item():.3f}" if device.type == "cpu" else None)
        return step.epoch_result()

    def validate() -> tuple[float, float]:
        return evaluate_logits(predict_logits(), val_labels, val_loss_fn)

    def predict_logits() -> torch.Tensor:
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
            apply_trainability(model, stages, current, plan)
        local = torch.cat(outputs) if outputs else torch.empty(0, context.head_spec.num_classes)
        if not distributed.active():
            return local
        rows = distributed.gather_shards(dict(zip(val_local, local)))
        return torch.stack([rows[i] for i in range(len(val_set))])

    checkpoint = start_phase(context, "finetune", model=model, optimizer=optimizer, scheduler=scheduler, generators={"batches": generator})
    if "trainable_stages" in checkpoint.extra:
        current = [bool(t) for t in checkpoint.extra["trainable_stages"]]  # the thaw stage reached
        apply_trainability(model, stages, current, plan)
    compiler = training_compiler(context, (epochs - checkpoint.start_epoch) * len(train_loader))
    with context.reporter.progress(f"{config.strategy} epochs", epochs) as advance:
        advance(checkpoint.start_epoch)

        def on_epoch(record, improved, state) -> None:
            context.on_epoch(state.history)
            checkpoint.save(state, {"trainable_stages": current})
            advance(1, status=f"loss {record.train_loss:.3f} val acc {record.val_accuracy:.3f}")

        result = fit(
            model=model, optimizer=optimizer, train_epoch=train_epoch, validate=validate,
            epochs=epochs, patience=patience, before_epoch=before_epoch, on_epoch=on_epoch,
            **starting_point(plan, model, validate, checkpoint),
        )
    model.load_state_dict(result.best_state)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    val_logits = predict_logits()
    model.cpu()
    return TrainOutcome(model=model, fit=result, val_logits=val_logits, notes={**notes, "training_compile": compiler.decision.to_dict()})


def training_compiler(context: TrainContext, total_steps: int) -> TrainingCompiler:
    """The run's `--compile` setting applied to its training steps (`graft.compiling`)."""
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


def _bn_affine_count(backbone: nn.Module, stage: Stage) -> int:
    modules = dict(backbone.named_modules())
    total = 0
    for name in stage.module_names:
        for sub in modules[name].modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.affine:
                total += sub.weight.numel() + sub.bias.numel()
    return total
