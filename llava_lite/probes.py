"""Measuring a CLIP: zero-shot image->caption retrieval and linear probes on patch features.

Both are used to judge the tiny CLIP (its README and test) and in notebooks 00 and 02.

- :func:`retrieval_recall`: candidates come in groups of ``group`` scenes (100: one correct
  caption among 100); each image ranks its group's captions; recall@k is how often its own
  caption is among the top k. Round ``r`` uses each scene's ``r``-th caption, and the rounds
  are averaged, so every captioning style is scored.
- :func:`scene_recall`: the standard image->text protocol of caption datasets (COCO's): each image
  ranks *all* captions of its group's scenes, and a hit is any of its own captions (or the same
  string) among the top k. A vague caption ("A picture of three objects.") then no longer has to
  beat the other scenes' captions on its own; the scene's most telling caption can win for it.
- :func:`linear_probe`: a logistic-regression probe (multi-label) trained on one set of scenes
  and scored on another; accuracy is counted per (scene, label) pair.
- :func:`scene_labels`: which shapes and which colours a scene contains, as 0/1 matrices.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

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


def _unit_embeddings(image_emb: torch.Tensor, caption_emb: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both embeddings as float unit vectors, after checking there is at least one full group."""
    if caption_emb.shape[0] < group:
        raise ValueError(f"retrieval needs at least {group} scenes, got {caption_emb.shape[0]}")
    return F.normalize(image_emb.float(), dim=-1), F.normalize(caption_emb.float(), dim=-1)


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, caption_emb: torch.Tensor, group: int = 100,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image->caption recall@k among ``group`` candidates.

    ``image_emb``: ``[N, D]``; ``caption_emb``: ``[N, R, D]``, R captions per scene (rounds).
    Scenes beyond the last full group are left out. Only captions scored strictly higher than the
    right one count against it: an exact tie means the same text (two scenes captioned alike). Returns ``{"r@1": .., "r@5": .., "n": ..}``.
    """
    img, cap = _unit_embeddings(image_emb, caption_emb, group)
    n, rounds = cap.shape[0], cap.shape[1]
    hits = {k: 0 for k in ks}
    total = 0
    for start in range(0, n - group + 1, group):
        gi = img[start:start + group]  # [G, D]
        for r in range(rounds):
            gc = cap[start:start + group, r]  # [G, D]
            sim = gi @ gc.T  # [G, G]: image i vs caption j
            own = sim.diagonal().unsqueeze(1)  # [G, 1]
            rank = (sim > own).sum(dim=1)  # captions scored strictly above the right one
            for k in ks:
                hits[k] += int((rank < k).sum())
            total += group
    return {**{f"r@{k}": hits[k] / total for k in ks}, "n": total}


@torch.no_grad()
def scene_recall(image_emb: torch.Tensor, caption_emb: torch.Tensor, texts: Sequence[Sequence[str]],
                 group: int = 100, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image->scene recall@k among ``group`` scenes, each represented by all its captions.

    ``image_emb``: ``[N, D]``; ``caption_emb``: ``[N, R, D]``; ``texts``: the ``N x R`` caption
    strings. Each image ranks the ``group * R`` captions of its group; it scores a hit at k when
    one of the top k is one of its own captions, or the same string as one (two scenes can be
    captioned alike). Returns ``{"r@1": .., "r@5": .., "n": ..}``.
    """
    img, cap = _unit_embeddings(image_emb, caption_emb, group)
    n, rounds = cap.shape[0], cap.shape[1]
    if len(texts) != n or any(len(t) != rounds for t in texts):
        raise ValueError(f"texts must be {n} lists of {rounds} captions, the shape of caption_emb")
    hits = {k: 0 for k in ks}
    total = 0
    for start in range(0, n - group + 1, group):
        gc = cap[start:start + group].reshape(group * rounds, -1)  # [G*R, D]
        flat = [t for ts in texts[start:start + group] for t in ts]
        order = (img[start:start + group] @ gc.T).argsort(dim=1, descending=True)[:, :max(ks)]  # [G, K]
        for i, top in enumerate(order.tolist()):
            own = set(texts[start + i])
            first = next((r for r, j in enumerate(top) if flat[j] in own), len(top))
            for k in ks:
                hits[k] += first < k
            total += 1
    return {**{f"r@{k}": hits[k] / total for k in ks}, "n": total}


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


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 l2: float = 1e-3, steps: int = 200) -> dict[str, float]:
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
        majority = (ytr.mean(0) > 0.5)  # [K]
        base = (majority.unsqueeze(0) == yte.bool()).float().mean()
    return {"accuracy": right.float().mean().item(), "all_right": right.all(1).float().mean().item(),
            "majority": base.item()}
