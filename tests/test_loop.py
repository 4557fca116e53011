"""The shared training step: what it reports per epoch is what the steps computed."""

from __future__ import annotations

import math

import torch
from torch import nn

from graft.loop import TrainSteps, make_optimizer, warmup_cosine_schedule


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
