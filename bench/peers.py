"""The peers of shared/benchmarks.md, run exactly as written there.

- textbook frozen loop: timm model + reset_classifier, backbone requires_grad=False, Adam 1e-3,
  `model.train()` every epoch (so BatchNorm statistics drift), random horizontal flip;
- textbook full fine-tune: the same with everything trainable at Adam 1e-4;
- fastai: `vision_learner(...).fine_tune(epochs, freeze_epochs=1)` in its own environment
  (bench/.venv-fastai, made by bench/setup_fastai.sh), run as a subprocess.
All at 224 px, bicubic resize, mean = std = 0.5, batch 32, 2 threads, torch seed 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

FASTAI_PYTHON = Path(__file__).parent / ".venv-fastai" / "bin" / "python"


def _loaders(root: Path, train_flip: bool = True):
    normalize = transforms.Normalize([0.5] * 3, [0.5] * 3)
    common = [transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC)]
    train_tf = transforms.Compose(common + ([transforms.RandomHorizontalFlip()] if train_flip else []) + [transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose(common + [transforms.ToTensor(), normalize])
    train = datasets.ImageFolder(root / "train", train_tf)
    return (
        DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)),
        {name: DataLoader(datasets.ImageFolder(root / name, eval_tf), batch_size=64) for name in ("valid", "test")},
    )


@torch.no_grad()
def _accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


def textbook(root: Path, *, full: bool, epochs: int = 5) -> dict:
    """The tutorials' loop; returns accuracies and wall time (validation only at the end)."""
    from graft.models.backbones import load_backbone

    torch.manual_seed(0)
    model = load_backbone("efficientnet_lite0").model
    model.reset_classifier(10)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(full or name.startswith("classifier"))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4 if full else 1e-3)
    train, evaluation = _loaders(root)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"val_accuracy": _accuracy(model, evaluation["valid"]), "test_accuracy": _accuracy(model, evaluation["test"]),
            "seconds": seconds, "trainable_params": trainable}


FASTAI_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(2); torch.manual_seed(0)
from pathlib import Path
from fastai.vision.all import ImageDataLoaders, Resize, Normalize, vision_learner, accuracy
from graft.models.backbones import load_backbone
root = Path(sys.argv[1]); epochs = int(sys.argv[2])
backbone = load_backbone("efficientnet_lite0").model
dls = ImageDataLoaders.from_folder(root, train="train", valid="valid", item_tfms=Resize(224), bs=32,
                                   batch_tfms=[Normalize.from_stats([0.5]*3, [0.5]*3)])
learn = vision_learner(dls, lambda pretrained=True, **kw: backbone, n_out=10, normalize=False, pretrained=True, cut=-2, metrics=accuracy)
started = time.perf_counter()
with learn.no_bar(), learn.no_logging():
    learn.fine_tune(epochs, freeze_epochs=1)
seconds = time.perf_counter() - started
val = float(learn.validate()[1])
test_dl = dls.test_dl(sorted((root / "test").rglob("*.png")), with_labels=True)
preds, targets = learn.get_preds(dl=test_dl)
print(json.dumps({"val_accuracy": val, "test_accuracy": float((preds.argmax(1) == targets).float().mean()), "seconds": seconds,
                  "trainable_params": sum(p.numel() for p in learn.model.parameters() if p.requires_grad)}))
"""


def fastai(root: Path, epochs: int = 4) -> dict | None:
    """fastai's fine_tune in its own environment; None if that environment was not made."""
    if not FASTAI_PYTHON.exists():
        print(f"fastai skipped: {FASTAI_PYTHON} missing (run bench/setup_fastai.sh)", file=sys.stderr)
        return None
    result = subprocess.run([str(FASTAI_PYTHON), "-c", FASTAI_SCRIPT, str(root), str(epochs)], capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])
