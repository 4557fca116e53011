"""Frozen-backbone features: what a tap keeps beside them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graft.input.data import load_labelled_folder
from graft.models.prefix import Chain, sequential_chain
from graft.training.features import FeatureCache, Tap, extract_features


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_tap_keeps_what_a_pass_of_the_prefix_alone_computes(lite0, fashion_folder: Path, tmp_path: Path, precision: str) -> None:
    """The outputs a tap keeps from a full pass are the frozen prefix's own, bit for bit (fp32 runs
    a folded copy of the backbone, and the prefix alone is folded on its own), and the pooled
    features are those of a pass without the tap. Items found in the cache are not run, so a tap
    keeps nothing for them."""
    split = load_labelled_folder(fashion_folder)[0]
    paths, digests = split.paths[:12], split.digests[:12]
    chain = sequential_chain(lite0.model, lite0.preprocessing.input_size)
    assert chain is not None
    end = [name for name, _ in chain].index("blocks.4") + 1
    prefix = Chain(chain[:end])

    tap = Tap("blocks.4")
    cache = FeatureCache(tmp_path, precision)
    pooled = extract_features(lite0, paths, digests, cache=cache, precision=precision, batch_size=5, tap=tap)
    assert torch.equal(pooled, extract_features(lite0, paths, digests, cache=None, precision=precision, batch_size=5))
    direct = extract_features(lite0, paths, digests, cache=None, precision=precision, model=prefix)
    assert direct.shape == (12, 112, 14, 14)
    assert sorted(tap.outputs) == sorted(digests)
    assert torch.equal(torch.stack([tap.outputs[d] for d in digests]).float(), direct)

    again = Tap("blocks.4")
    extract_features(lite0, paths, digests, cache=cache, precision=precision, tap=again)
    assert again.outputs == {}
