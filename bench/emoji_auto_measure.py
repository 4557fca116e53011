"""What `auto`'s probes read on label sets: whole-set accuracy at 0.5 against label-ranking AP.

On the emoji task of `bench/emoji_multilabel.py` (its `labels.csv`, with the `split` column), the
probes auto fits to choose the framing and the pooling (one-vs-rest logistic regression on at
most 2 000 training images' frozen EfficientNet-Lite0 features) are scored on the validation rows
both ways, the one-standard-error rule (`auto_rule.first_wins`) is applied under each, and each
probe's macro mAP on the held-out test rows says which choice was right.

    python bench/emoji_multilabel.py build --packs /tmp --out /tmp/emoji-task
    python bench/emoji_auto_measure.py --data /tmp/emoji-task/labels.csv --cache /tmp/emoji-auto-cache
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from graft.input.multilabel import load_task_dataset
from graft.models.backbones import load_backbone, with_crop, with_pooling
from graft.strategies.auto_measure import FRAMING_SAMPLE, _spread
from graft.strategies.auto_rule import LABEL_RANKING_AP, ViewScore, accuracy_difference_se, first_wins
from graft.training.features import FeatureCache, backbone_key, extract_features
from graft.training.metrics import label_ranking_precision, macro_average_precision

CANDIDATES = ((0.875, "avg"), (1.0, "avg"), (0.875, "grid"), (1.0, "grid"))
# (challenger, holder) pairs auto's rule compares: the framing on the average, the grid on each framing.
COMPARISONS = (((1.0, "avg"), (0.875, "avg")), ((0.875, "grid"), (0.875, "avg")), ((1.0, "grid"), (1.0, "avg")))


def _features(backbone, images, rows, cache_root: Path) -> np.ndarray:
    cache = FeatureCache(cache_root, backbone_key(backbone, backbone.preprocessing, "fp32"))
    return extract_features(backbone, [images.paths[i] for i in rows], [images.digests[i] for i in rows], cache=cache).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args()
    dataset = load_task_dataset(args.data)
    train, val, test = dataset.train, dataset.val, dataset.test
    parts = {"train": (train, _spread(len(train), FRAMING_SAMPLE)), "val": (val, _spread(len(val), FRAMING_SAMPLE)),
             "test": (test, list(range(len(test))))}
    truth = {name: np.asarray(images.labels)[rows] for name, (images, rows) in parts.items()}
    varied = (truth["train"].min(0) == 0) & (truth["train"].max(0) == 1)
    truth = {name: labels[:, varied] for name, labels in truth.items()}
    print(f"{len(parts['train'][1])} train / {len(parts['val'][1])} valid / {len(test)} test images, {int(varied.sum())} labels")
    scores, base = {}, load_backbone()
    for crop, pooling in CANDIDATES:
        backbone = with_pooling(with_crop(base, crop), pooling)
        features = {name: _features(backbone, images, rows, args.cache) for name, (images, rows) in parts.items()}
        probe = OneVsRestClassifier(LogisticRegression(max_iter=1000)).fit(features["train"], truth["train"])
        decision = probe.decision_function(features["val"])
        p = np.clip(1 / (1 + np.exp(-decision)), 1e-7, 1 - 1e-7)
        loss = float(-(truth["val"] * np.log(p) + (1 - truth["val"]) * np.log(1 - p)).mean())
        whole = ((decision >= 0) == (truth["val"] == 1)).all(1).astype(float)
        ranking = label_ranking_precision(truth["val"], decision)
        scores[crop, pooling] = (ViewScore(float(whole.mean()), loss, tuple(whole.tolist())),
                                 ViewScore(float(ranking.mean()), loss, tuple(ranking.tolist()), LABEL_RANKING_AP))
        test_map = macro_average_precision(truth["test"], probe.predict_proba(features["test"]))
        print(f"crop {crop:g} {pooling:4}  valid whole-set accuracy {whole.mean():.3f}  valid label-ranking AP "
              f"{ranking.mean():.3f}  valid log-loss {loss:.4f}  test macro mAP {test_map:.4f}", flush=True)
    for challenger, holder in COMPARISONS:
        for i, measure in enumerate(("whole-set accuracy", "label-ranking AP")):
            a, b = scores[challenger][i], scores[holder][i]
            wins, decided_by = first_wins(a, b)
            print(f"{challenger} vs {holder} by {measure}: difference {a.accuracy - b.accuracy:+.4f}, "
                  f"se {accuracy_difference_se(a, b):.4f}: {'challenger' if wins else 'holder'} ({decided_by})")


if __name__ == "__main__":
    main()
