"""Calibrated probabilities: one temperature fitted on the validation logits, and how well it does.

A network trained to minimise cross-entropy is usually over-confident on images it has not seen:
its softmax says 0.95 where it is right 80 % of the time. Temperature scaling (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017) divides every logit by one scalar T > 0, fitted
by minimising the negative log-likelihood of the validation labels. Dividing by a positive scalar
keeps the order of the logits, so the predicted class never changes; only the scores do.

graft fits T after training (`fit_temperature`), stores it in the bundle (graft.json
`temperature`), and every consumer divides by it: `Bundle.predict`, `graft evaluate`, `graft serve`
and the ONNX graph. The measures of `metrics.json` (`calibration_measures`) are torchmetrics'
expected calibration error over 15 equal-width confidence bins (`MulticlassCalibrationError`), the
negative log-likelihood and the multi-class Brier score (the mean over images of the squared
distance between the probability vector and the one-hot label, summed over classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

CALIBRATION_BINS = 15
# T outside these bounds means the validation set cannot say anything useful (e.g. every image
# right with huge margins drives T towards 0); the bounds keep the scores finite and meaningful.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on `labels` (LBFGS on log T).

    T > 1 softens over-confident scores, T < 1 sharpens timid ones; the result is kept within
    [MIN_TEMPERATURE, MAX_TEMPERATURE]. It is 1 where the logits get every label right: the NLL
    then keeps falling as T shrinks, with no minimum to fit.

    >>> fit_temperature(torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]), [0, 1, 1]) > 1  # one confident mistake
    True
    """
    logits = logits.detach().float().cpu().clone()  # a plain tensor, even from inference mode
    targets = torch.as_tensor(labels, dtype=torch.long)
    if len(targets) == 0 or bool((logits.argmax(1) == targets).all()):
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not np.isfinite(temperature):
        return 1.0
    return float(min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE))


def calibration_measures(probabilities: torch.Tensor, labels: torch.Tensor | list[int], *, bins: int = CALIBRATION_BINS) -> dict[str, float | None]:
    """`ece` (expected calibration error, `bins` equal-width bins), `nll` and `brier` of probabilities
    (N, classes); None for no image (JSON has no nan)."""
    # torchmetrics is imported here: it pulls in scipy and more, seconds that predict and serve never need.
    from torchmetrics.functional.classification import multiclass_calibration_error

    probabilities = probabilities.detach().double().cpu()
    targets = torch.as_tensor(labels, dtype=torch.long)
    if len(targets) == 0:
        return {"ece": None, "nll": None, "brier": None}
    classes = probabilities.shape[1]
    ece = multiclass_calibration_error(probabilities.float(), targets, num_classes=classes, n_bins=bins, norm="l1")
    picked = probabilities[torch.arange(len(targets)), targets]
    nll = -picked.clamp_min(torch.finfo(torch.float64).tiny).log().mean()
    one_hot = nn.functional.one_hot(targets, classes).double()
    brier = ((probabilities - one_hot) ** 2).sum(dim=1).mean()
    return {"ece": round(float(ece), 6), "nll": round(float(nll), 6), "brier": round(float(brier), 6)}


def reliability(probabilities: torch.Tensor, labels: torch.Tensor | list[int], *, bins: int = CALIBRATION_BINS) -> dict[str, list]:
    """Per confidence bin (equal width, as the ECE's): mean confidence, accuracy and image count.

    Empty bins have count 0 and confidence and accuracy None. This is what a reliability diagram draws.
    """
    confidence, predicted = probabilities.detach().float().cpu().max(dim=1)
    correct = (predicted == torch.as_tensor(labels, dtype=torch.long)).float()
    # Bin i holds confidences in [i/bins, (i+1)/bins), as torchmetrics' bins do (1.0 in the last).
    index = torch.floor(confidence * bins).long().clamp(0, bins - 1)
    rows: dict[str, list] = {"confidence": [], "accuracy": [], "count": []}
    for i in range(bins):
        inside = index == i
        count = int(inside.sum())
        rows["count"].append(count)
        rows["confidence"].append(round(float(confidence[inside].mean()), 6) if count else None)
        rows["accuracy"].append(round(float(correct[inside].mean()), 6) if count else None)
    return rows


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor | list[int], temperature: float) -> dict[str, Any]:
    """metrics.json's `calibration`: the temperature, and the measures and reliability bins of the
    probabilities before (T = 1) and after dividing the logits by it."""
    logits = logits.detach().float().cpu()
    summary: dict[str, Any] = {"temperature": round(temperature, 6), "bins": CALIBRATION_BINS}
    for name, scale in (("before", 1.0), ("after", temperature)):
        probabilities = (logits / scale).softmax(dim=1)
        summary[name] = {**calibration_measures(probabilities, labels), "reliability": reliability(probabilities, labels)}
    return summary


class TemperatureScaled(nn.Module):
    """`network`'s logits divided by `temperature`: softmax of its output gives calibrated probabilities.

    What the ONNX export traces, so the exported graph gives the bundle's own probabilities.
    """

    def __init__(self, network: nn.Module, temperature: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images) / self.temperature
