""""None of these": how unlike the training images an input is, and the threshold past which it is `unknown`.

A classifier answers with one of its classes for any input. The bundle therefore also keeps what
scores an input's distance from the training images, in the feature space its own head reads (the
frozen backbone's for feature-extract, the fine-tuned backbone's otherwise), and a threshold chosen
on the validation images so that `KEPT_SHARE` of them are kept. Two published scores:

- `knn` (Sun et al., ICML 2022, "Out-of-distribution detection with deep nearest neighbors"): the
  Euclidean distance from the input's L2-normalised feature to the k-th nearest normalised
  training feature. The bundle keeps the normalised training features.
- `mahalanobis` (Lee et al., NeurIPS 2018): the smallest Mahalanobis distance to a class mean
  under one covariance shared by the classes, on L2-normalised features (as Mueller and Hein,
  "Mahalanobis++", 2025, recommend: feature norms vary with the input far more than the
  Gaussian model allows). The bundle keeps the class means and the precision. Few-shot sets have
  fewer training images than feature dimensions (1 000 against 1 280 for 100-shot Fashion-MNIST
  on EfficientNet-Lite0), where the sample covariance is singular: graft shrinks it by
  Ledoit-Wolf (scikit-learn), where pytorch-ood's `Mahalanobis` inverts the raw scatter matrix
  plus a 1e-6 ridge, which bench/unknown.py measures as far worse there. For wider features (the
  grid poolings: 16 048 for `grid-3` on Lite0) a D x D precision would take minutes to fit and
  gigabytes to store; the same Ledoit-Wolf covariance is then kept as its leading `PROJECTED_DIM`
  eigenvectors with their shrunk variances and one shrunk variance for every other direction
  (computed from the n x n Gram matrix, exact while n <= `PROJECTED_DIM`).

The default (`DEFAULT_METHOD`) was chosen on bench/unknown.py (docs/shipping.md). Scoring
is a few tensor operations, written here rather than through pytorch-ood's detectors so that a
bundle predicts with torch alone (pytorch-ood's KNN keeps a scikit-learn index that a bundle would
have to rebuild at every load); bench/unknown.py checks the scores against pytorch-ood's `KNN`.
Everything is stored as tensors in unknown.safetensors and plain numbers in graft.json: nothing
is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graft.errors import BundleError
from graft.shipping.bundle_schema import DAMAGED, safetensors_shapes

UNKNOWN_LABEL = "unknown"
UNKNOWN_FILE = "unknown.safetensors"
METHODS = ("knn", "mahalanobis")
# Chosen on bench/unknown.py's "select" halves (docs/shipping.md): on 100-shot Fashion-MNIST the
# normalised Mahalanobis score's worst AUROC over MNIST, photos and emoji was 0.970, k-NN's best 0.935 (k 2).
DEFAULT_METHOD = "mahalanobis"
DEFAULT_K = 1  # k-NN's k, where `method="knn"` is asked for
KEPT_SHARE = 0.95  # of the in-distribution validation images kept at the threshold

# Mahalanobis on features wider than this keeps its covariance as eigenvectors (`low_rank_mahalanobis`).
MAX_FULL_DIM = 2048
PROJECTED_DIM = 256

# The tensors each method keeps, by name (wide Mahalanobis: "class_means", "projection", "inverse_variances").
_TENSORS = {"knn": ("train_features",), "mahalanobis": ("class_means", "precision")}


@dataclass(frozen=True)
class UnknownDetector:
    """Scores how unlike the training features a batch of features is; past `threshold` is unknown."""

    method: str
    threshold: float
    tensors: dict[str, torch.Tensor]
    k: int = DEFAULT_K
    kept_share: float = KEPT_SHARE
    val_rejected: float = 0.0  # the share of validation images past the threshold

    @property
    def feature_dim(self) -> int:
        return int(self.tensors[_TENSORS[self.method][0]].shape[1])

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) scores of (N, D) features: higher is less like the training images."""
        features = features.float()
        if self.method == "knn":
            return knn_scores(self.tensors["train_features"], features, self.k)
        normalised = torch.nn.functional.normalize(features, dim=1)
        if "projection" in self.tensors:
            return low_rank_scores(self.tensors["class_means"], self.tensors["projection"], self.tensors["inverse_variances"], normalised)
        return mahalanobis_scores(self.tensors["class_means"], self.tensors["precision"], normalised)

    def record(self) -> dict[str, Any]:
        """What graft.json keeps of it (`bundle_schema.UnknownRecord`); the tensors go to unknown.safetensors."""
        return {"method": self.method, "k": self.k, "threshold": self.threshold, "kept_share": self.kept_share,
                "val_rejected": round(self.val_rejected, 6), "feature_dim": self.feature_dim}


def fit_unknown_detector(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor, *,
                         method: str = DEFAULT_METHOD, k: int = DEFAULT_K, kept_share: float = KEPT_SHARE) -> UnknownDetector:
    """Fit `method` on the training features (N, D) and labels, and place its threshold at the
    `kept_share` quantile of the validation features' scores."""
    train_features = train_features.float()
    if method == "knn":
        k = max(1, min(k, len(train_features)))
        tensors = {"train_features": torch.nn.functional.normalize(train_features, dim=1).contiguous()}
    else:
        normalised = torch.nn.functional.normalize(train_features, dim=1)
        if normalised.shape[1] > MAX_FULL_DIM:
            tensors = low_rank_mahalanobis(normalised, train_labels, PROJECTED_DIM)
        else:
            means, precision = fit_mahalanobis(normalised, train_labels)
            tensors = {"class_means": means, "precision": precision}
    detector = UnknownDetector(method=method, threshold=0.0, tensors=tensors, k=k, kept_share=kept_share)
    val_scores = detector.scores(val_features)
    threshold = float(torch.quantile(val_scores.double(), kept_share))
    rejected = float((val_scores > threshold).float().mean())
    return UnknownDetector(method=method, threshold=threshold, tensors=tensors, k=k, kept_share=kept_share, val_rejected=rejected)


def knn_scores(train_normalised: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each normalised feature to its k-th nearest normalised training feature (Sun et al. 2022)."""
    query = torch.nn.functional.normalize(features.float(), dim=1)
    distances = torch.cdist(query, train_normalised.float())
    return distances.kthvalue(min(k, distances.shape[1]), dim=1).values


def fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (C, D) and the precision (D, D) of their shared covariance, Ledoit-Wolf shrunk."""
    from sklearn.covariance import LedoitWolf  # scikit-learn is a core dependency; imported here for import speed

    labels = torch.as_tensor(labels)
    means = _class_means(features, labels)
    centred = (features - means[labels]).double().numpy()
    precision = torch.from_numpy(LedoitWolf(assume_centered=True).fit(centred).precision_).float()
    return means.contiguous(), precision.contiguous()


def low_rank_mahalanobis(features: torch.Tensor, labels: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """`fit_mahalanobis`'s Ledoit-Wolf covariance for wide features, without a D x D matrix.

    Shrinkage and target follow scikit-learn's `ledoit_wolf_shrinkage` (assume_centered), from the
    n x n Gram matrix of the class-centred features; the covariance's leading `rank` eigenvectors
    keep their shrunk variances, every other direction the shrunk mean of the remaining ones.
    """
    labels = torch.as_tensor(labels)
    means = _class_means(features, labels)
    centred = (features - means[labels]).double()
    n, dim = centred.shape
    squared = (centred ** 2).sum(1)
    trace = float(squared.sum()) / n  # of the sample covariance S = X^T X / n
    mu = trace / dim
    frobenius = float(((centred @ centred.T) ** 2).sum()) / n ** 2  # ||S||_F^2
    beta = (float((squared ** 2).sum()) / n - frobenius) / (dim * n)
    delta = frobenius / dim - mu ** 2
    shrinkage = 0.0 if beta <= 0 or delta <= 0 else min(beta, delta) / delta
    if n > 2 * rank:
        torch.manual_seed(0)  # the randomised SVD's start: the same bundle from the same features
        _, singular, directions = torch.svd_lowrank(centred, q=rank, niter=4)
    else:
        _, singular, right = torch.linalg.svd(centred, full_matrices=False)
        directions = right.T
    count = min(rank, len(singular))
    variances = singular[:count] ** 2 / n
    rest = max(trace - float(variances.sum()), 0.0) / max(dim - count, 1)
    inverse = torch.cat([1 / ((1 - shrinkage) * variances + shrinkage * mu), torch.tensor([1 / ((1 - shrinkage) * rest + shrinkage * mu)])])
    return {"class_means": means.contiguous(), "projection": directions[:, :count].float().contiguous(),
            "inverse_variances": inverse.float()}


def low_rank_scores(means: torch.Tensor, projection: torch.Tensor, inverse_variances: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`mahalanobis_scores` under `low_rank_mahalanobis`'s covariance."""
    centred = features.float().unsqueeze(1) - means.unsqueeze(0)  # (N, C, D)
    along = centred @ projection  # (N, C, rank)
    outside = ((centred ** 2).sum(-1) - (along ** 2).sum(-1)).clamp(min=0)
    return ((along ** 2) @ inverse_variances[:-1] + outside * inverse_variances[-1]).min(dim=1).values


def _class_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    classes = int(labels.max()) + 1
    return torch.stack([features[labels == c].mean(0) if bool((labels == c).any()) else features.mean(0) for c in range(classes)])


def mahalanobis_scores(means: torch.Tensor, precision: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Smallest squared Mahalanobis distance of each feature to a class mean (Lee et al. 2018)."""
    centred = features.float().unsqueeze(1) - means.unsqueeze(0)  # (N, C, D)
    return torch.einsum("ncd,de,nce->nc", centred, precision, centred).min(dim=1).values


def save_unknown(folder: Path, detector: UnknownDetector) -> None:
    """Write the detector's tensors as `folder/unknown.safetensors`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in detector.tensors.items()}, str(folder / UNKNOWN_FILE),
              metadata={"format": "graft-unknown", "method": detector.method})


def load_unknown(folder: Path, record: Any, class_count: int, in_features: int) -> UnknownDetector:
    """The detector that graft.json's `unknown` record (`bundle_schema.UnknownRecord`) describes,
    its tensors read from unknown.safetensors and checked against the record before use."""
    from safetensors.torch import load_file

    path = folder / UNKNOWN_FILE
    if not path.is_file():
        raise BundleError(f"{folder / 'graft.json'}: unknown is recorded but {UNKNOWN_FILE} is missing; {DAMAGED}")
    dim = record.feature_dim
    if dim != in_features:
        raise BundleError(f"{folder / 'graft.json'}: unknown.feature_dim is {dim} but the head takes {in_features} features; {DAMAGED}")
    shapes = safetensors_shapes(path)
    rank = shapes["projection"][1] if record.method == "mahalanobis" and len(shapes.get("projection", ())) == 2 else None
    expected = ({"train_features": (None, dim)} if record.method == "knn" else
                {"class_means": (class_count, dim), "precision": (dim, dim)} if rank is None else
                {"class_means": (class_count, dim), "projection": (dim, rank), "inverse_variances": (rank + 1,)})
    for name, shape in expected.items():
        found = shapes.get(name)
        if found is None or len(found) != len(shape) or any(want is not None and want != got for want, got in zip(shape, found)) or found[0] < 1:
            raise BundleError(f"{path}: {name} is {list(found) if found else 'missing'}, expected {['N' if s is None else s for s in shape]} "
                              f"for unknown.method {record.method!r} and feature_dim {dim}; {DAMAGED}")
    tensors = {name: tensor.float() for name, tensor in load_file(str(path)).items() if name in expected}
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise BundleError(f"{path}: holds nan or inf; {DAMAGED}")
    return UnknownDetector(method=record.method, threshold=record.threshold, tensors=tensors, k=record.k,
                           kept_share=record.kept_share, val_rejected=record.val_rejected)
