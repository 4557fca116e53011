"""Classification metrics: scikit-learn's definitions, on real predictions of a real bundle."""

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

import graft
from graft.shipping.bundle import load_bundle
from graft.training.metrics import classification_metrics

NAMES = ["bag", "sneaker", "trouser", "shirt"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_metrics_match_scikit_learn_whichever_classes_occur(pairs):
    truth, predicted = map(list, zip(*pairs))
    metrics = classification_metrics(truth, predicted, NAMES)
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    used = sorted(set(truth) | set(predicted))
    assert metrics["macro_f1_classes"] == [NAMES[i] for i in used]
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=range(4), zero_division=0)
    for i, name in enumerate(NAMES):
        row = metrics["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[i], recall[i], f1[i]), abs=1e-6)
        assert row["support"] == support[i]


def test_evaluate_on_a_one_class_folder_averages_as_scikit_learn(trained_run, holdout_folder, tmp_path):
    # A "bag" folder as users have them: 4 bags and 2 trousers filed among them by mistake.
    folder = tmp_path / "bags" / "bag"
    folder.mkdir(parents=True)
    for image in sorted((holdout_folder / "bag").glob("*.png"))[:4] + sorted((holdout_folder / "trouser").glob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
    metrics = graft.evaluate(trained_run.bundle_dir, tmp_path / "bags")
    bundle = load_bundle(trained_run.bundle_dir)
    predicted = [p.label for p in bundle.predict(sorted(folder.iterdir()), unknown="off")]  # evaluate scores the classes
    truth = ["bag"] * len(predicted)
    assert metrics["accuracy"] < 1.0, "the bundle calls the filed-in trousers trouser"
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert "bag" in metrics["macro_f1_classes"] and len(metrics["macro_f1_classes"]) >= 2
    assert metrics["macro_f1"] < metrics["per_class"]["bag"]["f1"]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda labels: st.lists(
    st.tuples(st.lists(st.booleans(), min_size=labels, max_size=labels),
              st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=labels, max_size=labels)),
    min_size=1, max_size=30)))
def test_label_ranking_precision_per_image_averages_to_scikit_learns_score(rows):
    """Ties in the scores, images with no true label and with every label true, one label to many."""
    import numpy as np
    from sklearn.metrics import label_ranking_average_precision_score

    from graft.training.metrics import label_ranking_precision

    truth = np.array([row[0] for row in rows], dtype=int)
    scores = np.array([row[1] for row in rows])
    per_image = label_ranking_precision(truth, scores)
    assert per_image.shape == (len(rows),) and ((0 <= per_image) & (per_image <= 1)).all()
    assert per_image.mean() == pytest.approx(label_ranking_average_precision_score(truth, scores), abs=1e-12)
    for i in range(len(rows)):  # each image's term is scikit-learn's score of that image alone
        assert per_image[i] == pytest.approx(label_ranking_average_precision_score(truth[i:i + 1], scores[i:i + 1]), abs=1e-12)
