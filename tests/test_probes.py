"""Linear probes on features: a probe finds what separable features hold, and no more."""

from __future__ import annotations

import torch

from llava_lite.probes import linear_probe


def test_linear_probe_beats_majority_on_separable_labels():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, :2] > 0).float()
    r = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert r["accuracy"] > 0.95 and r["majority"] < 0.7


def test_linear_probe_finds_nothing_in_features_that_hold_nothing():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 8, generator=g), (torch.rand(400, 2, generator=g) > 0.5).float()
    r = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert r["accuracy"] < 0.62 and r["all_right"] < 0.4
