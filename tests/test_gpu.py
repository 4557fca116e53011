"""The same code on a CUDA GPU: features, each kind of training loop, bundles that move between devices.

Every test here needs a CUDA GPU and is skipped, saying so, where there is none (CI has none); run
them on a GPU machine with `pytest -m gpu`. Real weights and real Fashion-MNIST images throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graft
from graft.input.data import load_labelled_folder
from graft.models.stages import discover_stages
from graft.shipping.bundle import load_bundle
from graft.speed.numerics import BF16_TOLERANCE, cpu_supports_bf16
from graft.training.features import extract_features

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"),
]

CUDA = torch.device("cuda")


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def test_cuda_features_agree_with_cpu_fp32(lite0, fashion_folder: Path) -> None:
    split = load_labelled_folder(fashion_folder)[0]
    reference = extract_features(lite0, split.paths, split.digests, cache=None, precision="fp32")
    cpu_bf16 = extract_features(lite0, split.paths, split.digests, cache=None, precision="bf16") if cpu_supports_bf16() else None
    fp32 = extract_features(lite0, split.paths, split.digests, cache=None, precision="fp32", device=CUDA)
    bf16 = extract_features(lite0, split.paths, split.digests, cache=None, precision="bf16", device=CUDA)
    lite0.model.cpu()
    # cuDNN may run float32 convolutions in TF32 (PyTorch's default for convolutions): ~1e-3.
    assert _relative_error(fp32, reference) <= 5e-3
    # On these upscaled 28 px images bf16 moves features more than on ImageNet photos (0.062 on the
    # CPU and on an H100, against 0.035 there): CUDA's bf16 must be no further off than the CPU's.
    if cpu_bf16 is not None:
        assert _relative_error(bf16, reference) <= 1.2 * _relative_error(cpu_bf16, reference)
    assert _relative_error(bf16, reference) <= 0.08
    # What matters downstream: a probe fitted on CPU fp32 features predicts alike from CUDA bf16 ones.
    labels = torch.tensor(split.labels)
    head = torch.nn.Linear(reference.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(reference), labels).backward()
        optimizer.step()
    with torch.no_grad():
        agreement = float((head(reference).argmax(1) == head(bf16).argmax(1)).float().mean())
    assert agreement >= BF16_TOLERANCE["fewshot_top1_agreement"]


def test_cuda_bf16_imagenet_predictions_agree_with_cpu_fp32(foolbox_imagenet) -> None:
    from graft.models.backbones import load_backbone

    backbone = load_backbone("efficientnet_lite0", keep_classifier=True)
    paths = [path for path, _ in foolbox_imagenet]
    names = [p.name for p in paths]
    fp32 = extract_features(backbone, paths, names, cache=None, precision="fp32")
    bf16 = extract_features(backbone, paths, names, cache=None, precision="bf16", device=CUDA)
    backbone.model.cpu()
    assert _relative_error(bf16, fp32) <= BF16_TOLERANCE["feature_relative_error"]
    with torch.no_grad():
        p32 = backbone.imagenet_classifier(fp32).softmax(1)
        p16 = backbone.imagenet_classifier(bf16).softmax(1)
    assert float((p32.argmax(1) == p16.argmax(1)).float().mean()) >= BF16_TOLERANCE["imagenet_top1_agreement"]
    assert float((p32 - p16).abs().max()) <= BF16_TOLERANCE["imagenet_max_prob_diff"]
    top1 = sum(int(p) == label for p, (_, label) in zip(p16.argmax(1), foolbox_imagenet)) / len(paths)
    assert top1 >= 0.8  # the pretrained weights on the GPU still know ImageNet (0.85 on the CPU)


def test_cuda_extraction_in_worker_processes_gives_the_threads_features(lite0, fashion_folder: Path) -> None:
    split = load_labelled_folder(fashion_folder)[0]
    thread = extract_features(lite0, split.paths, split.digests, cache=None, precision="bf16", device=CUDA,
                              num_workers=0, batch_size=8)
    processes = extract_features(lite0, split.paths, split.digests, cache=None, precision="bf16", device=CUDA,
                                 num_workers=3, batch_size=8)
    lite0.model.cpu()
    assert processes.shape == thread.shape
    assert _relative_error(processes, thread) <= 1e-3  # the same pixels; only cuDNN's algorithm choice may differ


def test_cuda_batches_are_normalised_on_the_gpu_as_on_the_host(lite0, fashion_folder: Path) -> None:
    """uint8 pixels cross to the GPU and are normalised there: the same float32 values as the
    host's normalisation, in the thread, in worker processes, and from a half-filled store."""
    from graft.input.pipeline import DecodedImages, image_batches
    from graft.input.preprocessing import build_transforms

    split = load_labelled_folder(fashion_folder)[0]
    transform = build_transforms(lite0.preprocessing)
    on_host = torch.cat(list(image_batches(split.paths, transform, batch_size=8, store=None)))
    store = DecodedImages(10**9)
    keys = [f"{digest}.gpu-test" for digest in split.digests]
    for half in split.paths[::2]:  # the thread fills half of the store; the processes decode the rest
        list(image_batches([half], transform, batch_size=8, keys=[keys[split.paths.index(half)]], store=store))
    for workers, given_store in ((0, None), (2, None), (2, store)):
        batches = list(image_batches(split.paths, transform, batch_size=8, keys=keys, store=given_store, workers=workers, device=CUDA))
        assert all(b.device.type == "cuda" and b.dtype == torch.float32 for b in batches)
        assert all(b.is_contiguous(memory_format=torch.channels_last) for b in batches)
        torch.testing.assert_close(torch.cat(batches).cpu(), on_host, atol=1e-6, rtol=0, msg=f"{workers} workers")
    assert len(store) == len(split.paths)


@pytest.mark.parametrize("strategy", ["feature-extract", "partial", "full", "gradual", "lp-ft", "lora"])
def test_training_on_cuda_gives_a_bundle_that_predicts_alike_on_cpu(strategy: str, fashion_folder: Path, tmp_path: Path) -> None:
    options = {"epochs": 2, "thaw_every": 1} if strategy == "gradual" else {"epochs": 2}
    run = graft.train(fashion_folder, out=tmp_path / strategy, strategy=strategy, device="cuda", verbose=False, **options)
    bundle = load_bundle(run.bundle_dir)
    assert bundle.meta["precision"] == "bf16"  # auto precision on a GPU that runs bf16
    if strategy == "partial":  # the frozen prefix's outputs were cached (computed on the GPU)
        assert "cached_prefix" in run.metrics
    # The run's validation predictions, made on the GPU while training, against the bundle's.
    recorded = json.loads((run.run_dir / "val_predictions.json").read_text())
    paths = [fashion_folder / row["path"] for row in recorded]
    on_cpu = [p.label for p in bundle.predict(paths)]
    on_gpu = [p.label for p in bundle.to("cuda").predict(paths)]
    assert bundle.precision == "bf16"
    assert _agreement(on_gpu, [row["label"] for row in recorded]) >= BF16_TOLERANCE["fewshot_top1_agreement"]
    assert _agreement(on_cpu, on_gpu) >= BF16_TOLERANCE["fewshot_top1_agreement"]
    accuracy = _agreement(on_gpu, [row["true"] for row in recorded])
    assert abs(accuracy - run.metrics["accuracy"]) <= 1 / len(paths) + 1e-9


def _agreement(labels: list[str], others: list[str]) -> float:
    assert len(labels) == len(others) > 0
    return sum(a == b for a, b in zip(labels, others)) / len(labels)


def test_partial_on_cuda_keeps_frozen_stages_bitwise(fashion_folder: Path, tmp_path: Path, lite0) -> None:
    state = {k: v.detach().cpu().clone() for k, v in lite0.model.state_dict().items()}
    stages = discover_stages(lite0.model)
    run = graft.train(fashion_folder, out=tmp_path / "p", strategy="partial", train_stages=2, epochs=2, augment_views=1,
                      bn_stats="update", device="cuda", verbose=False)
    # The frozen prefix's outputs were cached on the GPU. (With the backbone already there, as after
    # lp-ft's probe, finding the prefix once failed: tests/test_strategies.py's lp-ft case checks
    # that, and it runs on the GPU wherever the suite does.)
    assert run.metrics["cached_prefix"] == "blocks.4"
    trained = load_bundle(run.bundle_dir).model.backbone.state_dict()
    for stage in stages[:-2]:
        for key in (k for k in state if k.startswith(tuple(m + "." for m in stage.module_names))):
            assert torch.equal(state[key], trained[key]), f"{key} of frozen stage {stage.name} changed on the GPU"
    last = [k for k in state if k.startswith(tuple(m + "." for m in stages[-1].module_names)) and k.endswith("weight")]
    assert any(not torch.equal(state[k], trained[k]) for k in last), "the trainable stage did not move on the GPU"


def test_a_compiled_training_step_on_cuda_moves_the_weights_as_the_eager_one(lite0) -> None:
    """`--compile on`: the real backbone's step through torch.compile updates like the eager step."""
    import copy

    from torch import nn

    from graft.speed.compiling import TrainingCompiler
    from graft.models.heads import HeadSpec, make_head
    from graft.training.loop import TrainSteps, make_optimizer, warmup_cosine_schedule
    from graft.models.model import GraftModel

    torch.manual_seed(0)
    base = GraftModel(copy.deepcopy(lite0.model), make_head(HeadSpec("linear", lite0.num_features, 3))).to(CUDA)
    base.to(memory_format=torch.channels_last).train()
    initial = {k: v.detach().clone() for k, v in base.state_dict().items()}
    batches = [(torch.randn(8, 3, 224, 224, device=CUDA), torch.randint(0, 3, (8,), device=CUDA)) for _ in range(3)]
    trained = {}
    for name in ("eager", "compiled"):
        model = copy.deepcopy(base)
        optimizer = make_optimizer([{"params": list(model.parameters()), "lr": 1e-4}], CUDA)
        scheduler = warmup_cosine_schedule(optimizer, epochs=1, steps_per_epoch=3, warmup_epochs=0)
        compiler = TrainingCompiler("on", CUDA, 3, say=lambda _: None) if name == "compiled" else None
        steps = TrainSteps(model, nn.CrossEntropyLoss(), optimizer, scheduler, precision="fp32", device=CUDA, compiler=compiler)
        for images, labels in batches:
            steps(images, labels)
        if compiler is not None:
            assert compiler.decision.compiled and compiler.decision.compile_seconds is not None
        trained[name] = {k: v.detach().float() for k, v in model.state_dict().items()}
    update = sum(float((trained["eager"][k] - initial[k].float()).norm() ** 2) for k in initial) ** 0.5
    apart = sum(float((trained["compiled"][k] - trained["eager"][k]).norm() ** 2) for k in initial) ** 0.5
    assert update > 0
    assert apart <= 0.05 * update, f"compiled and eager steps differ by {apart / update:.3f} of the update"


def test_compile_auto_on_cuda_times_the_steps_before_it_decides(fashion_folder: Path, tmp_path: Path) -> None:
    """`--compile auto` on a GPU measures the run's own steps; a run this short stays eager."""
    run = graft.train(fashion_folder, out=tmp_path / "auto", strategy="full", epochs=2, batch_size=2, device="cuda", verbose=False)
    decision = run.metrics["training_compile"]
    assert decision["setting"] == "auto" and decision["compiled"] is False
    assert decision["step_seconds"] > 0 and decision["remaining_steps"] > 0
    assert "steps left" in decision["reason"] or "waited for input" in decision["reason"]
