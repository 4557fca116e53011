"""Splitting a backbone into a frozen prefix and a trainable suffix, when its forward is a chain.

Most CNN backbones in timm (EfficientNet, ResNet, ConvNeXt, MobileNet, RegNet...) compute their
pooled features by running their top-level children in order, with the stage containers
(`blocks`, `layers`, `stages`) being `nn.Sequential`. For those, the output of a frozen prefix can
be computed once per image and cached, and training runs only the suffix: no forward, and no
backward, through frozen stages at all. Whether a model is such a chain is not assumed: the chain
is built from the model's children and checked numerically against the model's own forward, and
a model that fails the check (a ViT, with its class token) simply trains without the prefix cache.
"""

from __future__ import annotations

import torch
from torch import nn

from graft.models.stages import Stage


def sequential_chain(backbone: nn.Module, input_size: tuple[int, int, int]) -> list[tuple[str, nn.Module]] | None:
    """The backbone as an ordered list of (name, module), or None if its forward is not that chain."""
    chain: list[tuple[str, nn.Module]] = []
    for name, child in backbone.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            chain.extend((f"{name}.{sub_name}", sub) for sub_name, sub in child.named_children())
        else:
            chain.append((name, child))
    if not chain:
        return None
    was_training = backbone.training
    backbone.eval()
    try:
        generator = torch.Generator().manual_seed(0)
        # On the backbone's own device: a CPU probe through a model on the GPU would fail, and
        # the failure would read as "not a chain" (no cached prefix, silently).
        device = next(backbone.parameters(), torch.empty(0)).device
        probe = torch.randn((2, *input_size), generator=generator).to(device)
        with torch.no_grad():
            expected = backbone(probe)
            value = probe
            for _, module in chain:
                value = module(value)
        matches = value.shape == expected.shape and torch.allclose(value, expected, atol=1e-5, rtol=1e-4)
    except Exception:  # any shape or type mismatch means "not a plain chain"
        matches = False
    finally:
        backbone.train(was_training)
    return chain if matches else None


def split_index(chain: list[tuple[str, nn.Module]], stages: list[Stage], first_trainable_stage: int) -> int | None:
    """Position in `chain` where the first trainable stage begins (None if it cannot be found)."""
    names = stages[first_trainable_stage].module_names
    for position, (name, _) in enumerate(chain):
        if any(name == m or name.startswith(m + ".") or m.startswith(name + ".") for m in names):
            # A chain element that also holds earlier, frozen stages cannot start the suffix.
            earlier = {m for s in stages[:first_trainable_stage] for m in s.module_names}
            if any(m == name or m.startswith(name + ".") for m in earlier):
                return None
            return position
    return None


class Chain(nn.Module):
    """A run of chain elements as one module (the prefix or the suffix)."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.names = [name for name, _ in modules]
        self.parts = nn.ModuleList([module for _, module in modules])

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            value = part(value)
        return value
