"""LoRA adapters (peft) on a backbone's convolutions and linear layers.

The adapters are injected with `peft.inject_adapter_in_model`, which keeps the model a plain
`nn.Module` (no PeftModel wrapper), so the bundle's state dict holds the base weights and the
adapters under fixed names, and `load_bundle` re-injects the same adapters before loading.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from graft.errors import ConfigError


def lora_targets(backbone: nn.Module) -> list[str]:
    """Names of the layers that get adapters: linear layers and ungrouped convolutions.

    Depthwise and grouped convolutions are left alone: they hold few parameters, and a low-rank
    update of a per-channel kernel saves nothing.
    """
    targets = []
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            targets.append(name)
    if not targets:
        raise ConfigError("--strategy lora: the backbone has no linear or convolution layer to adapt")
    return targets


def apply_lora(model: nn.Module, *, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0) -> dict[str, Any]:
    """Inject LoRA adapters into `model.backbone`; returns the spec stored in the bundle."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError('--strategy lora needs peft: pip install "graft[lora]"') from None
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout, bias="none")
    model.backbone = inject_adapter_in_model(config, model.backbone)
    return {"kind": "lora", "rank": rank, "alpha": alpha, "target_modules": target_modules}


def is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")
