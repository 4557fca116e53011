"""The backbone's stages, from input to head, discovered from timm's own metadata.

A stage is a group of parameters that strategies freeze, thaw and give a learning rate together.
They come from the model's `group_matcher(coarse=True)` (the same groups timm uses for layer-wise
learning-rate decay), so no architecture is special-cased; output channels and stride come from
`feature_info` where the model declares it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Stage:
    """One group of the backbone's parameters, in input-to-output order."""

    index: int
    name: str
    param_names: tuple[str, ...]
    module_names: tuple[str, ...]  # modules whose parameters all belong to this stage
    num_params: int
    out_channels: int | None = None
    reduction: int | None = None


def discover_stages(model: nn.Module) -> list[Stage]:
    """The stages of a timm backbone (classifier removed), from the input to the head.

    Works for any model that implements timm's `group_matcher`; others fall back to their
    top-level children, which is timm's own behaviour for un-grouped models.
    """
    from timm.models import group_parameters

    named = dict(model.named_parameters())
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        try:
            groups = group_parameters(model, matcher(coarse=True))
        except NotImplementedError:
            groups = _groups_by_child(model)
    else:
        groups = _groups_by_child(model)
    ordered = [list(names) for _, names in sorted(groups.items()) if names]
    feature_info = _feature_info(model)
    stages = []
    for index, names in enumerate(ordered):
        modules = _modules_of(model, set(names))
        stage_name = _stage_name(names, modules)
        channels, reduction = None, None
        for module_name, (chs, red) in feature_info.items():
            if any(m == module_name or m.startswith(module_name + ".") for m in modules):
                channels, reduction = chs, red
        stages.append(
            Stage(
                index=index,
                name=stage_name,
                param_names=tuple(names),
                module_names=tuple(modules),
                num_params=sum(named[n].numel() for n in names),
                out_channels=channels,
                reduction=reduction,
            )
        )
    return stages


def _groups_by_child(model: nn.Module) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for index, (child_name, child) in enumerate(model.named_children()):
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            groups[index] = names
    return groups


def _feature_info(model: nn.Module) -> dict[str, tuple[int | None, int | None]]:
    info = getattr(model, "feature_info", None)
    result: dict[str, tuple[int | None, int | None]] = {}
    if not info:
        return result
    for entry in info:
        if isinstance(entry, dict) and "module" in entry:
            result[str(entry["module"])] = (entry.get("num_chs"), entry.get("reduction"))
    return result


def _modules_of(model: nn.Module, param_names: set[str]) -> list[str]:
    """The outermost modules all of whose parameters (and at least one) are in `param_names`."""
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        own = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if own and all(p in param_names for p in own):
            chosen.append(name)
    return chosen


def _stage_name(param_names: list[str], modules: list[str]) -> str:
    # The stage's outermost modules, plus loose parameters (a ViT's cls_token): "blocks.3".
    parts = [m for m in modules]
    for name in param_names:
        if not any(name.startswith(m + ".") for m in modules):
            loose = name.rsplit(".", 1)[0] if "." in name else name
            if loose not in parts:
                parts.append(loose)
    return "+".join(parts[:4]) + ("+..." if len(parts) > 4 else "")
