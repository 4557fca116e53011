"""bf16 autocast against fp32 on real images, within the documented tolerance (`BF16_TOLERANCE`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graft.speed.numerics import BF16_TOLERANCE, cpu_supports_bf16, inference_precision, resolve_precision
from graft.training.features import extract_features

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")


def _imagenet_jpegs() -> list[Path]:
    foolbox = pytest.importorskip("foolbox")
    paths = sorted(Path(foolbox.__file__).parent.joinpath("data").glob("imagenet_*.jpg"))
    if not paths:
        pytest.skip("foolbox's ImageNet sample JPEGs are not installed")
    return paths


def test_auto_resolves_to_a_concrete_precision() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert inference_precision("fp32", cpu) == "fp32"
    assert inference_precision(None, cpu) == "fp32"
    assert inference_precision("bf16", cpu) == resolve_precision("auto", cpu)


@needs_bf16
def test_bf16_imagenet_predictions_agree_with_fp32() -> None:
    from graft.models.backbones import load_backbone

    backbone = load_backbone("efficientnet_lite0", keep_classifier=True)
    paths = _imagenet_jpegs()
    names = [p.name for p in paths]
    fp32 = extract_features(backbone, paths, names, cache=None, precision="fp32")
    bf16 = extract_features(backbone, paths, names, cache=None, precision="bf16")
    relative_error = float((fp32 - bf16).norm() / fp32.norm())
    assert relative_error <= BF16_TOLERANCE["feature_relative_error"]
    with torch.no_grad():
        p32 = backbone.imagenet_classifier(fp32).softmax(1)
        p16 = backbone.imagenet_classifier(bf16).softmax(1)
    agreement = float((p32.argmax(1) == p16.argmax(1)).float().mean())
    assert agreement >= BF16_TOLERANCE["imagenet_top1_agreement"]
    assert float((p32 - p16).abs().max()) <= BF16_TOLERANCE["imagenet_max_prob_diff"]


@needs_bf16
def test_bf16_few_shot_head_agrees_with_fp32(lite0, fashion_folder: Path) -> None:
    """A head fitted on fp32 features of real Fashion-MNIST images, fed bf16 features instead."""
    from graft.input.data import load_labelled_folder

    split = load_labelled_folder(fashion_folder)[0]
    fp32 = extract_features(lite0, split.paths, split.digests, cache=None, precision="fp32")
    bf16 = extract_features(lite0, split.paths, split.digests, cache=None, precision="bf16")
    labels = torch.tensor(split.labels)
    head = torch.nn.Linear(fp32.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(100):  # a well-fitted linear probe on the fp32 features
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(fp32), labels).backward()
        optimizer.step()
    with torch.no_grad():
        p32, p16 = head(fp32).argmax(1), head(bf16).argmax(1)
    assert float((p32 == p16).float().mean()) >= BF16_TOLERANCE["fewshot_top1_agreement"]
    accuracy32 = float((p32 == labels).float().mean())
    accuracy16 = float((p16 == labels).float().mean())
    assert abs(accuracy32 - accuracy16) <= max(BF16_TOLERANCE["fewshot_accuracy_diff"], 1 / len(labels))


def test_compile_is_chosen_from_the_measured_break_even() -> None:
    from graft.errors import ConfigError
    from graft.speed.numerics import COMPILE_BREAK_EVEN_IMAGES, should_compile

    cpu = torch.device("cpu")
    assert not should_compile("auto", COMPILE_BREAK_EVEN_IMAGES - 1, cpu)
    assert should_compile("auto", COMPILE_BREAK_EVEN_IMAGES, cpu)
    assert not should_compile("auto", 10**6, torch.device("cuda"))  # decoding, not the forward, bounds it there
    assert should_compile("on", 1, cpu) and not should_compile("off", 10**6, cpu)
    with pytest.raises(ConfigError, match="^compile: "):
        should_compile("always", 1, cpu)


def test_a_compiled_backbone_gives_the_eager_features(fashion_folder: Path, tmp_path: Path) -> None:
    """`--compile on` really runs compiled code, and its cached features match eager ones."""
    import graft
    from graft.models.backbones import load_backbone
    from graft.input.data import load_labelled_folder
    from graft.training.features import FeatureCache, backbone_key

    run = graft.train(fashion_folder, strategy="feature-extract", out=tmp_path / "run", compile="on", epochs=2, verbose=False, cache_dir=str(tmp_path / "cache"))
    assert run.metrics["backbone_compiled"] is True
    precision = run.metrics.get("precision") or __import__("json").loads((run.run_dir / "config.json").read_text())["resolved"]["precision"]
    train = load_labelled_folder(fashion_folder)[0]
    backbone = load_backbone()
    stored = FeatureCache(tmp_path / "cache", backbone_key(backbone, backbone.preprocessing, precision)).get(train.digests)
    assert len(stored) == len(train)  # what the compiled run computed and cached
    compiled = torch.stack([stored[d] for d in train.digests])
    eager = extract_features(backbone, train.paths, train.digests, cache=None, precision=precision)
    error = ((compiled - eager).norm(dim=1) / eager.norm(dim=1)).max().item()
    assert error < BF16_TOLERANCE["feature_relative_error"]


def test_a_compiled_forward_is_kept_once_per_model_and_dies_with_it() -> None:
    """The compiled wrapper holds its model, so a global table keyed by the model never freed it."""
    import copy
    import gc
    import pickle
    import weakref

    from graft.training.features import _compiled, compiled_forward

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    entry = _compiled(model)  # torch.compile is lazy: nothing compiles before the first batch
    assert _compiled(model) is entry and compiled_forward(model) is entry  # compiled once per model
    assert compiled_forward(copy.deepcopy(model)) is None  # a copy (the folded one) compiles itself
    assert compiled_forward(pickle.loads(pickle.dumps(model))) is None
    assert len(list(model.children())) == 2 and set(model.state_dict()) == set(copy.deepcopy(model).state_dict())
    alive = weakref.ref(model)
    del model, entry
    gc.collect()
    assert alive() is None


def test_a_failing_compile_falls_back_to_eager_once_and_is_remembered(lite0, fashion_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that fails (no C++ compiler, an unsupported op) warns once, gives the eager
    features, and is not tried again for the same model."""
    import copy
    import warnings

    from graft.training import features
    from graft.input.data import load_labelled_folder

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no compiler here")

    monkeypatch.setattr(features.torch, "compile", lambda model: Broken())
    split = load_labelled_folder(fashion_folder)[0]
    paths, digests = split.paths[:4], split.digests[:4]
    model = copy.deepcopy(lite0.model)
    eager = extract_features(lite0, paths, digests, cache=None, precision="bf16", model=model)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        first = extract_features(lite0, paths, digests, cache=None, precision="bf16", model=model, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would mean it tried the broken compile again
        second = extract_features(lite0, paths, digests, cache=None, precision="bf16", model=model, compile=True)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert features.compiled_forward(model) is not None and features._compiled(model) is None


@needs_bf16
def test_cpu_bf16_training_runs_the_trained_depthwise_convolutions_in_fp32(lite0, fashion_folder: Path) -> None:
    """oneDNN's bf16 depthwise backward is the slow layer on a CPU (bench/train_precision.py): in a
    bf16 training step the depthwise convolutions that get gradients run in fp32, everything else
    in bf16; in a frozen prefix and at inference every depthwise convolution stays bf16."""
    import copy

    from torch import nn

    from graft.config import TrainConfig
    from graft.input.data import load_labelled_folder
    from graft.models.heads import HeadSpec, make_head
    from graft.training.loop import TrainSteps, make_optimizer, warmup_cosine_schedule
    from graft.models.model import GraftModel
    from graft.speed.numerics import autocast
    from graft.input.pipeline import EvalImages
    from graft.models.stages import discover_stages
    from graft.strategies.finetune import Partial, apply_trainability, param_groups

    cpu = torch.device("cpu")
    backbone = copy.deepcopy(lite0.model)  # the session's backbone stays as it was
    stages = discover_stages(backbone)
    model = GraftModel(backbone, make_head(HeadSpec(kind="linear", in_features=lite0.num_features, num_classes=3)))
    plan = Partial().plan(stages, TrainConfig(data=".", out=".", train_stages=2))
    apply_trainability(model, stages, plan.trainable_at(0), plan)
    optimizer = make_optimizer(param_groups(model, stages, plan, 0.0), cpu)
    scheduler = warmup_cosine_schedule(optimizer, epochs=1, steps_per_epoch=1, warmup_epochs=0)
    step = TrainSteps(model, nn.CrossEntropyLoss(), optimizer, scheduler, precision="bf16", device=cpu)
    depthwise = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels}
    pointwise = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    dtypes: dict[str, torch.dtype] = {}
    for name, module in {**depthwise, **pointwise}.items():
        module.register_forward_hook(lambda _m, _i, out, name=name: dtypes.__setitem__(name, out.dtype))
    split = load_labelled_folder(fashion_folder)[0]
    images = next(iter(EvalImages(split.paths[:8], split.digests[:8], lite0.preprocessing, batch_size=8)))
    trained = {name for name, m in depthwise.items() if m.weight.requires_grad}
    assert trained and len(trained) < len(depthwise)
    before = {name: depthwise[name].weight.detach().clone() for name in trained}

    loss = step(images, torch.tensor(split.labels[:8]))
    assert torch.isfinite(loss)
    assert {name: dtypes[name] for name in trained} == {name: torch.float32 for name in trained}
    assert {name: dtypes[name] for name in depthwise if name not in trained} == {name: torch.bfloat16 for name in depthwise if name not in trained}
    assert set(dtypes[name] for name in pointwise) == {torch.bfloat16}
    assert all(not torch.equal(before[name], depthwise[name].weight) for name in trained)

    dtypes.clear()
    with torch.inference_mode(), autocast("bf16", cpu):
        model.eval()(images)
    assert set(dtypes[name] for name in depthwise) == {torch.bfloat16}
