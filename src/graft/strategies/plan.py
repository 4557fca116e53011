"""What a fine-tuning run trains: the `StagePlan`, the trainability it sets and its optimizer groups.

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

from dataclasses import dataclass, field

from torch import nn

from graft.models.lora import is_adapter_parameter
from graft.models.model import GraftModel
from graft.models.stages import Stage


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


def apply_trainability(model: GraftModel, stages: list[Stage], trainable: list[bool], plan: StagePlan) -> None:
    """Set requires_grad per stage; BatchNorm of frozen stages (and of every stage when the plan
    freezes BN statistics) runs in eval mode, so its running statistics never move."""

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
