"""What patch tokens hold: which object covers each patch, a per-patch linear probe, and a PCA
colour map of patch features (notebook 02 compares the last and the penultimate layer with them).

Patch ``k`` of a ``grid x grid`` tower covers row ``k // grid``, column ``k % grid`` of the image
(row-major, the order open_clip emits them).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .facts import COLOURS, SHAPES, Obj
from .probes import fit_linear, standardise

CLASSES = {"colour": ("background", *COLOURS), "shape": ("background", *SHAPES), "size": ("background", "small", "large")}
FIELD = {"colour": "colour", "shape": "kind", "size": "size"}  # the Obj attribute each class list names


def patch_labels(scenes: Sequence[Sequence[Obj]], grid: int, attr: str = "colour") -> torch.Tensor:
    """``[N, grid*grid]`` class ids: the ``attr`` of the object whose box holds the patch's centre,
    0 (background) where none does."""
    names = CLASSES[attr]
    out = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) / grid
    for i, objs in enumerate(scenes):
        for o in objs:
            value = getattr(o, FIELD[attr])
            x1, y1, x2, y2 = o.box
            rows = ((centres >= y1) & (centres <= y2)).nonzero().flatten()
            cols = ((centres >= x1) & (centres <= x2)).nonzero().flatten()
            for r in rows.tolist():
                for c in cols.tolist():
                    out[i, r * grid + c] = names.index(value)
    return out


def patch_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                l2: float = 1e-4, steps: int = 100) -> dict[str, float]:
    """A softmax linear probe on single patch features ``[N, P, D]`` -> class ``[N, P]``.

    Returns accuracy on all test patches, on object patches only (background is the easy
    majority), and the majority-class baseline.
    """
    d = train_x.shape[-1]
    xtr, ytr = train_x.reshape(-1, d).float(), train_y.reshape(-1)
    xte, yte = test_x.reshape(-1, d).float(), test_y.reshape(-1)
    xtr, xte = standardise(xtr, xte)
    k = int(max(ytr.max(), yte.max())) + 1
    w, b = fit_linear(xtr, k, lambda logits: F.cross_entropy(logits, ytr), l2, steps)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(-1)
        obj = yte != 0
        majority = torch.bincount(ytr, minlength=k).argmax()
    return {"accuracy": (pred == yte).float().mean().item(),
            "object_patches": (pred[obj] == yte[obj]).float().mean().item() if obj.any() else float("nan"),
            "majority": (yte == majority).float().mean().item()}


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """``[P, D]`` patch features -> ``[grid, grid, 3]`` in 0..1: the first three principal
    components as red, green and blue (patches that look alike to the tower get alike colours)."""
    x = features.float() - features.float().mean(0)
    _, _, v = torch.pca_lowrank(x, q=3, center=False)
    comp = x @ v[:, :3]  # [P, 3]
    lo, hi = comp.min(0).values, comp.max(0).values
    comp = (comp - lo) / (hi - lo + 1e-8)
    grid = int(round(features.shape[0] ** 0.5))
    return comp.reshape(grid, grid, 3)


@torch.no_grad()
def _features(tower, paths, batch: int = 100) -> torch.Tensor:
    return torch.cat([tower(tower.pixels(paths[i:i + batch])) for i in range(0, len(paths), batch)])  # [N, P, D]


def compare_layers(towers: dict, contexts: Sequence, image_dir, attrs: Sequence[str] = ("colour", "shape"),
                   fit_share: float = 0.75) -> list[dict]:
    """Per-patch probes for each ``{layer: tower}``: fitted on the first ``fit_share`` of the
    scenes, scored on the rest. One row per (layer, attribute)."""
    cut = int(len(contexts) * fit_share)
    parts = {"fit": contexts[:cut], "held": contexts[cut:]}
    rows = []
    for layer, tower in towers.items():
        x = {n: _features(tower, [image_dir / c.file_name for c in part]) for n, part in parts.items()}
        for attr in attrs:
            y = {n: patch_labels([c.objects for c in part], tower.grid, attr) for n, part in parts.items()}
            r = patch_probe(x["fit"], y["fit"], x["held"], y["held"])
            rows.append({"layer": layer, "predicts": attr, "all patches": round(r["accuracy"], 3),
                         "object patches": round(r["object_patches"], 3), "majority class": round(r["majority"], 3)})
    return rows
