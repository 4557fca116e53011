"""The adapted network: a pretrained backbone and a new head, as one plain `nn.Module`."""

from __future__ import annotations

import torch
from torch import nn


class GraftModel(nn.Module):
    """`backbone` (a timm model returning pooled features) followed by `head` (logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))
