"""The shared training step: what it reports per epoch is what the steps computed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import graft

from graft.training.loop import TrainSteps, make_optimizer, warmup_cosine_schedule


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_train_steps_report_the_mean_loss_and_accuracy_of_the_steps() -> None:
    torch.manual_seed(0)
    model, reference = _small_net(), _small_net()
    reference.load_state_dict(model.state_dict())
    cpu = torch.device("cpu")
    batches = [(torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,))) for n in (5, 5, 3)]  # a short last batch

    optimizer = make_optimizer([{"params": list(model.parameters()), "lr": 1e-2}], cpu)
    scheduler = warmup_cosine_schedule(optimizer, epochs=1, steps_per_epoch=3, warmup_epochs=0)
    steps = TrainSteps(model, nn.CrossEntropyLoss(), optimizer, scheduler, precision="fp32", device=cpu)
    returned = [float(steps(images, labels)) for images, labels in batches]
    loss, accuracy = steps.epoch_result()

    # The same steps written out by hand, reading every value back at once.
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    scheduler = warmup_cosine_schedule(optimizer, epochs=1, steps_per_epoch=3, warmup_epochs=0)
    losses, correct = [], 0
    for images, labels in batches:
        logits = reference(images)
        step_loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(step_loss.item())
        correct += int((logits.argmax(1) == labels).sum())

    assert len(returned) == len(losses)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(returned, losses))
    assert math.isclose(loss, sum(v * len(b[1]) for v, b in zip(losses, batches)) / 13, rel_tol=1e-6)
    assert accuracy == correct / 13
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(mine, theirs, atol=1e-6)
    empty_loss, empty_accuracy = steps.epoch_result()  # a new epoch starts with nothing counted
    assert math.isnan(empty_loss) and math.isnan(empty_accuracy)


def test_a_fitted_starting_model_is_kept_unless_an_epoch_beats_it_on_validation() -> None:
    """lp-ft's guard: the probe it starts from competes as epoch -1 (`starting_point`)."""
    from types import SimpleNamespace

    from graft.training.loop import fit
    from graft.training.phase import starting_point

    def run(scores: list[float], candidate: bool) -> tuple[object, torch.Tensor, dict]:
        model = torch.nn.Linear(2, 2)
        start = model.weight.detach().clone()
        given = iter(scores)

        def train_epoch(epoch: int) -> tuple[float, float]:
            with torch.no_grad():
                model.weight.add_(1.0)  # every epoch changes the model
            return 0.5, 0.5

        phase = SimpleNamespace(model=model, start_is_candidate=candidate)
        kwargs, notes = starting_point(phase, lambda: (1.0, next(given)), {})
        result = fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_epoch=train_epoch,
                     validate=lambda: (1.0, next(given)), epochs=2, patience=None, **kwargs)
        return result, start, notes

    result, start, notes = run([0.7, 0.6, 0.65], candidate=True)  # the start, then two worse epochs
    assert result.best_epoch == -1 and torch.equal(result.best_state["weight"], start)
    assert notes["start_val_accuracy"] == 0.7
    result, start, _ = run([0.7, 0.75, 0.6], candidate=True)  # the first epoch beats it
    assert result.best_epoch == 0 and torch.equal(result.best_state["weight"], start + 1.0)
    result, _, notes = run([0.6, 0.65], candidate=False)  # a new head: the start does not compete
    assert result.best_epoch == 1 and "start_val_accuracy" not in notes


# --- non-finite numbers never reach the run folder --------------------------------------------------


def _strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_diverging_run_stops_at_the_first_non_finite_epoch_and_keeps_the_last_good_checkpoint(fashion_folder, tmp_path) -> None:
    """lr x weight decay = 9 flips and grows the head's weights every step: on the real folder they
    pass float32's range in the second epoch. The run stops there, naming the epoch and the options."""
    from safetensors.torch import load_file

    out = tmp_path / "diverged"
    with pytest.raises(graft.GraftError, match=r"diverged in epoch 2 of 8: the training loss is nan.*--lr .*3.*--weight-decay") as caught:
        graft.train(fashion_folder, strategy="feature-extract", out=out, lr=3.0, weight_decay=3.0, batch_size=1, epochs=8, device="cpu", verbose=False)
    assert type(caught.value).__name__ == "TrainingError"
    assert str(out) in str(caught.value) and "checkpoint" in str(caught.value)
    assert not (out / "bundle").exists() and not (out / "metrics.json").exists()
    history = [_strict_json(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0]
    checkpoint = _strict_json((out / "checkpoint" / "state.json").read_text())
    assert checkpoint["epoch"] == 0
    tensors = load_file(str(out / "checkpoint" / "tensors.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_a_bundle_of_non_finite_weights_is_never_written(trained_run, tmp_path) -> None:
    from graft.shipping.bundle import save_bundle

    bundle = trained_run.load_bundle()
    with torch.no_grad():
        next(bundle.model.head.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(graft.GraftError, match="not written.*nan or inf"):
        save_bundle(tmp_path / "bundle", bundle.model, bundle.meta)
    assert not (tmp_path / "bundle").exists()


def test_json_files_never_hold_nan_or_infinity(tmp_path) -> None:
    from graft.atomic import write_json

    with pytest.raises(graft.GraftError, match=r"scores\.json: not written, \['history'\]\[1\]\['val_loss'\] is not a finite number"):
        write_json(tmp_path / "scores.json", {"history": [{"val_loss": 0.5}, {"val_loss": float("nan")}]})
    assert not (tmp_path / "scores.json").exists()
    write_json(tmp_path / "scores.json", {"history": [{"val_loss": 0.5}]})
    assert _strict_json((tmp_path / "scores.json").read_text()) == {"history": [{"val_loss": 0.5}]}
