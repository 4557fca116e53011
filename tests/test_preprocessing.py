"""Every augmentation level builds and runs on a real image; evaluation is deterministic."""

import pytest
import torch
from PIL import Image

from graft.choices import AUGMENT_LEVELS
from graft.errors import ConfigError
from graft.input.preprocessing import build_transforms


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return Image.fromarray(data.coffee())


@pytest.mark.parametrize("level", AUGMENT_LEVELS)
def test_each_augment_level_gives_the_backbones_input(lite0, photo, level):
    transform = build_transforms(lite0.preprocessing, augment=level)
    torch.manual_seed(0)
    first, second = transform(photo), transform(photo)
    for _ in range(40):  # random ops with random magnitudes: many draws, none may fail
        assert transform(photo).shape == (3, 224, 224)
    assert first.shape == second.shape == (3, 224, 224)
    if level == "none":
        assert torch.equal(first, second)
    else:
        assert not torch.equal(first, second)  # random crops/flips/ops differ between draws


def test_unknown_augment_level_is_refused(lite0):
    with pytest.raises(ConfigError, match="^augment: "):
        build_transforms(lite0.preprocessing, augment="extreme")
