"""What a vision tower's features hold, measured by linear probes.

- :func:`linear_probe` on pooled patch tokens (:func:`shape_colour_probe`): which shapes and
  colours a scene holds, a logistic-regression probe trained on one set of scenes and scored on
  another, accuracy counted per (scene, label) pair;
- :func:`patch_probe` on single patch tokens (:func:`object_patch_probe`, :func:`compare_layers`):
  the colour, shape or size of the object under one patch (what stage 2 needs to pick an object
  out by one attribute and read off another); :func:`patch_labels` says which object covers
  each patch;
- :func:`pca_rgb`: the first three principal components of an image's patch tokens as colours.

Patch ``k`` of a ``grid x grid`` tower covers row ``k // grid``, column ``k % grid`` of the image
(row-major, the order open_clip emits them). Notebook 02 compares the last and the penultimate
layer with these probes; the tiny CLIP's card reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .evaluate import wilson_interval
from .facts import COLOURS, SHAPES, Obj


def scene_labels(scenes: Sequence[Sequence[Obj]]) -> dict[str, torch.Tensor]:
    """``{"shape": [N, 3], "colour": [N, 6]}`` presence labels (float 0/1) for lists of objects."""
    shape = torch.zeros(len(scenes), len(SHAPES))
    colour = torch.zeros(len(scenes), len(COLOURS))
    for i, objs in enumerate(scenes):
        for o in objs:
            shape[i, SHAPES.index(o.kind)] = 1
            colour[i, COLOURS.index(o.colour)] = 1
    return {"shape": shape, "colour": colour}


def standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training set's mean and spread (per feature)."""
    mu, sd = train_x.float().mean(0), train_x.float().std(0) + 1e-6
    return (train_x.float() - mu) / sd, (test_x.float() - mu) / sd


def fit_linear(x: torch.Tensor, out_dim: int, loss_fn, l2: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, b)`` of a linear map ``x @ w + b`` minimising ``loss_fn(logits) + l2 * |w|^2`` (L-BFGS)."""
    w = torch.zeros(x.shape[1], out_dim, requires_grad=True)
    b = torch.zeros(out_dim, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(x @ w + b) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float = 1e-3,
    steps: int = 200,
) -> dict[str, float]:
    """Fit a multi-label logistic regression on ``[N, D]`` features and ``[N, K]`` 0/1 labels.

    Features are standardised with the training set's statistics. Returns the test accuracy per
    (scene, label) pair, the share of test scenes with every label right, and the accuracy of
    always answering each label's majority value (the baseline to beat).
    """
    xtr, xte = standardise(train_x, test_x)
    ytr, yte = train_y.float(), test_y.float()
    w, b = fit_linear(xtr, ytr.shape[1], lambda logits: F.binary_cross_entropy_with_logits(logits, ytr), l2, steps)
    with torch.no_grad():
        pred = (xte @ w + b) > 0  # [N, K]
        right = pred == yte.bool()
        majority = ytr.mean(0) > 0.5  # [K]
        base = (majority.unsqueeze(0) == yte.bool()).float().mean()
    return {
        "accuracy": right.float().mean().item(),
        "all_right": right.all(1).float().mean().item(),
        "majority": base.item(),
    }


CLASSES = {
    "colour": ("background", *COLOURS),
    "shape": ("background", *SHAPES),
    "size": ("background", "small", "large"),
}
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


def patch_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float = 1e-4,
    steps: int = 100,
) -> dict[str, float]:
    """A softmax linear probe on single patch features ``[N, P, D]`` -> class ``[N, P]``.

    Returns the accuracy on all test patches and on object patches only (class not 0), each with
    its own baseline: the training set's most common class among the same kind of patches
    (background for all patches, one object class for object patches), scored on the test patches.
    ``patches`` and ``object_patch_count`` are the test counts the accuracies are shares of.
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
        counts = torch.bincount(ytr[ytr != 0], minlength=k)
        obj_majority = counts.argmax() if counts.sum() else torch.tensor(1)
    nan = float("nan")
    return {
        "accuracy": (pred == yte).float().mean().item(),
        "object_patches": (pred[obj] == yte[obj]).float().mean().item() if obj.any() else nan,
        "majority": (yte == majority).float().mean().item(),
        "object_majority": (yte[obj] == obj_majority).float().mean().item() if obj.any() else nan,
        "patches": int(yte.numel()),
        "object_patch_count": int(obj.sum()),
    }


def _share_with_interval(share: float, n: int) -> str:
    """``"0.812 [0.79, 0.83]"``: a share of ``n`` with its 95% Wilson interval."""
    lo, hi = wilson_interval(round(share * n), n)
    return f"{share:.3f} [{lo:.2f}, {hi:.2f}]"


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


def compare_layers(
    towers: dict, contexts: Sequence, image_dir, attrs: Sequence[str] = ("colour", "shape"), fit_share: float = 0.75
) -> list[dict]:
    """Per-patch probes for each ``{layer: tower}``: fitted on the first ``fit_share`` of the
    scenes, scored on the rest. One row per (layer, attribute)."""
    cut = int(len(contexts) * fit_share)
    parts = {"fit": contexts[:cut], "held": contexts[cut:]}
    rows = []
    for layer, tower in towers.items():
        x = {n: tower.encode([image_dir / c.file_name for c in part], 100) for n, part in parts.items()}  # [N, P, D]
        for attr in attrs:
            y = {n: patch_labels([c.objects for c in part], tower.grid, attr) for n, part in parts.items()}
            r = patch_probe(x["fit"], y["fit"], x["held"], y["held"])
            rows.append(
                {
                    "layer": layer,
                    "predicts": attr,
                    "object patches [95%]": _share_with_interval(r["object_patches"], r["object_patch_count"]),
                    "object-patch majority": round(r["object_majority"], 3),
                    "all patches [95%]": _share_with_interval(r["accuracy"], r["patches"]),
                    "all-patch majority": round(r["majority"], 3),
                }
            )
    return rows


def shape_colour_probe(
    tower, images_u8: torch.Tensor, objects: list[list[Obj]], tokens: torch.Tensor | None = None
) -> dict[str, dict[str, float]]:
    """Linear probes on pooled patch features: which shapes / colours a scene holds.

    The first half of the scenes trains the probe, the second half scores it. ``tokens``: the
    tower's patch tokens of ``images_u8``, if already computed.
    """
    feats = (tower.encode(images_u8) if tokens is None else tokens).mean(dim=1)  # [N, W]
    labels = scene_labels(objects)
    h = len(feats) // 2
    return {k: linear_probe(feats[:h], y[:h], feats[h:], y[h:]) for k, y in labels.items()}


def object_patch_probe(
    tower, images_u8: torch.Tensor, objects: list[list[Obj]], tokens: torch.Tensor | None = None
) -> dict[str, dict[str, float]]:
    """Per-patch probes: does one patch token tell the colour, shape and size of the object under
    it? (What stage 2 needs to pick an object out by one attribute and read off another.) Fitted
    on the first half of the scenes, scored on the object patches of the second half."""
    x = tower.encode(images_u8) if tokens is None else tokens  # [N, P, D]
    h, out = len(x) // 2, {}
    for attr in ("colour", "shape", "size"):
        y = patch_labels(objects, tower.grid, attr)  # [N, P]
        obj = y[h:] != 0
        majority = torch.bincount(y[:h][y[:h] != 0]).argmax()
        r = patch_probe(x[:h], y[:h], x[h:], y[h:])
        out[attr] = {"accuracy": r["object_patches"], "majority": (y[h:][obj] == majority).float().mean().item()}
    return out
