"""How much of the pretrained backbone survived training, stage by stage.

Two measures, both per stage (`graft.models.stages.discover_stages`, input to head):

- **weight drift**: ``||w - w0|| / ||w0||`` over all of the stage's parameters together, where
  ``w0`` are the pretrained weights. 0 means untouched; 0.1 means the weights moved by a tenth of
  their own size.
- **feature similarity**: linear CKA (Kornblith et al., 2019) between the stage's outputs in the
  trained backbone and in the pretrained one, on the same validation images. 1 means the stage
  still computes the same representation (up to rotation and scale); lower means it was rewritten.

Stage outputs come from forward hooks on each stage's last outermost module, so any timm model
whose stages `discover_stages` finds works, without architecture-specific code.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from graft.models.stages import Stage, discover_stages

# CKA needs every image's features at once (a Gram matrix); this many images bound the cost.
MAX_CKA_IMAGES = 64


@dataclass(frozen=True)
class StageForgetting:
    """One stage's distance from the pretrained backbone."""

    index: int
    name: str
    num_params: int
    drift: float | None  # ||w - w0|| / ||w0||; None when the stage's weights cannot be matched
    cka: float | None  # linear CKA of the stage's outputs, trained vs pretrained; None if not measured
    unchanged: bool  # this stage and all before it are bit-identical to the pretrained ones

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment between two representations of the same n examples.

    `x` is (n, p) and `y` is (n, q) (any further dimensions are flattened). The result lies in
    [0, 1]; it is 1 for identical representations and unchanged by orthogonal transforms and
    isotropic scaling of either one. Computed in float64 from centered Gram matrices, so it costs
    O(n² (p + q)) and never forms a p × q matrix.

    >>> x = torch.randn(50, 8)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: both inputs need the same number of rows (examples), got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka: needs at least 2 examples")
    return cka_from_grams(centered_gram(x), centered_gram(y))


def centered_gram(x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """The (n, n) Gram matrix of the column-centered rows of `x`, in float64."""
    x = x.reshape(x.shape[0], -1)
    gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    # Column chunks keep the float64 copy small for wide early-stage feature maps (~400k columns).
    for start in range(0, x.shape[1], chunk):
        block = x[:, start : start + chunk].to(torch.float64)
        block = block - block.mean(dim=0, keepdim=True)
        gram += block @ block.T
    return gram


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor) -> float:
    """Linear CKA from two centered Gram matrices: <Kx, Ky> / (||Kx|| ||Ky||)."""
    cross = float((gram_x * gram_y).sum())
    norms = float(torch.linalg.norm(gram_x)) * float(torch.linalg.norm(gram_y))
    if norms == 0.0:
        # A constant representation carries no information; identical constants count as equal.
        return 1.0 if torch.equal(gram_x, gram_y) else 0.0
    return min(1.0, max(0.0, cross / norms))


def weight_drift(trained: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor], names: Sequence[str]) -> float | None:
    """Relative L2 drift ``||w - w0|| / ||w0||`` of the parameters `names`, all taken together.

    Returns None when a name is missing from either state or the shapes differ (the weights
    cannot be matched one to one), and 0.0 for a stage whose pretrained weights are all zero
    and unchanged.
    """
    moved, size = 0.0, 0.0
    for name in names:
        if name not in trained or name not in pretrained or trained[name].shape != pretrained[name].shape:
            return None
        before, after = pretrained[name].detach(), trained[name].detach()
        size += float(torch.sum(before.double() ** 2))
        if not torch.equal(before, after):  # an untouched tensor adds exactly 0: skip the subtraction
            moved += float(torch.sum((after.double() - before.double()) ** 2))
    if size == 0.0:
        return 0.0 if moved == 0.0 else float("inf")
    return (moved / size) ** 0.5


@contextlib.contextmanager
def capture_stage_outputs(model: nn.Module, stages: Sequence[Stage]) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record each stage's output during forward passes of `model` (a timm backbone).

    Yields {stage index: [output of each forward pass]}. The output of a stage is that of its
    last outermost module; stages without modules (loose parameters such as a ViT's cls token)
    or whose module the model lacks are left out.
    """
    modules = dict(model.named_modules())
    outputs: dict[int, list[torch.Tensor]] = {}
    handles = []
    for stage in stages:
        if not stage.module_names or stage.module_names[-1] not in modules:
            continue
        outputs[stage.index] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any, index: int = stage.index) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor):
                outputs[index].append(tensor.detach().float().cpu())

        handles.append(modules[stage.module_names[-1]].register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def stage_features(model: nn.Module, stages: Sequence[Stage], images: torch.Tensor, batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Each stage's outputs for a batch of preprocessed images: {stage index: (n, ...)}."""
    model.eval()
    with capture_stage_outputs(model, stages) as outputs:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    return {index: torch.cat(chunks) for index, chunks in outputs.items() if chunks}


def stage_forgetting(
    trained: nn.Module,
    pretrained: nn.Module,
    images: torch.Tensor | Callable[[], torch.Tensor],
    *,
    stages: Sequence[Stage] | None = None,
    skip_unchanged: bool = True,
) -> list[StageForgetting]:
    """Weight drift and linear CKA per stage of `trained` against `pretrained` (both backbones).

    `images` are preprocessed validation images (n, 3, H, W), or a function that returns them
    (called only if some stage needs a forward pass); only the first `MAX_CKA_IMAGES` are used. With `skip_unchanged`, stages whose weights and buffers (and those of every stage
    before them) are bit-identical to the pretrained ones get CKA 1 without a forward pass: their
    outputs are the same numbers. A feature-extract run therefore costs no forward pass at all.
    """

    if isinstance(trained, nn.Module) and hasattr(trained, "backbone") and hasattr(trained, "head"):
        trained = trained.backbone  # a GraftModel: compare its backbone
    stages = list(stages) if stages is not None else discover_stages(pretrained)
    trained_params = dict(trained.named_parameters())
    pretrained_params = dict(pretrained.named_parameters())
    trained_state = trained.state_dict()
    pretrained_state = pretrained.state_dict()

    unchanged_so_far = True
    chain: list[bool] = []
    drifts: list[float | None] = []
    for stage in stages:
        drifts.append(weight_drift(trained_params, pretrained_params, stage.param_names))
        unchanged_so_far = unchanged_so_far and _state_identical(trained_state, pretrained_state, stage)
        chain.append(unchanged_so_far)

    ckas: dict[int, float] = {stage.index: 1.0 for stage, same in zip(stages, chain) if same and skip_unchanged}
    to_measure = [stage for stage in stages if stage.index not in ckas]
    if to_measure and callable(images):
        images = images()
    if to_measure and len(images) >= 2:
        images = images[:MAX_CKA_IMAGES]
        after = stage_features(trained, to_measure, images)
        before = stage_features(pretrained, to_measure, images)
        for stage in to_measure:
            if stage.index in after and stage.index in before:
                ckas[stage.index] = linear_cka(after[stage.index], before[stage.index])
    return [
        StageForgetting(
            index=stage.index, name=stage.name, num_params=stage.num_params,
            drift=drift, cka=ckas.get(stage.index), unchanged=same,
        )
        for stage, drift, same in zip(stages, drifts, chain)
    ]


def _state_identical(trained: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor], stage: Stage) -> bool:
    """True when every parameter and buffer of the stage is bit-identical in both states."""
    prefixes = tuple(name + "." for name in stage.module_names)
    keys = {k for k in pretrained if k.startswith(prefixes)} | set(stage.param_names)
    for key in keys:
        if key not in trained or key not in pretrained:
            return False
        if trained[key].shape != pretrained[key].shape or not torch.equal(trained[key].cpu(), pretrained[key].cpu()):
            return False
    return True
