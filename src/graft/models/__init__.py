"""The network: backbones and their stages, heads, pooling, LoRA adapters, frozen-prefix caching."""
