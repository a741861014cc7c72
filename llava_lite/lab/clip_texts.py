"""The texts the tiny CLIP is paired with: world captions, descriptions, and their counterfactuals.

Each step pairs every image with one text: one of its five world captions, or (with probability
``describe_prob``) a description naming every object with colour, shape and size, or (with
``shape_prob``) one naming them by shape and size only. A description forces the image encoder
to keep the shape and colour of each object, not only the most salient one; a shape-only one
cannot be matched by colour at all.

Each description comes with a *counterfactual* one, worded alike but true of the scene with one
fact changed (:func:`counterfactual`): scored as a hard negative, it is a text only an encoder
that sees that very fact can tell from the right one. :class:`TextBank` draws every image's
texts once, builds the word-level tokenizer over them and draws each batch's texts from them.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from ..facts import COLOURS, SHAPES, Obj
from ..retrieval import object_description
from .config import ClipTexts
from .tokenizers import build_tokenizer, tokenize

N_DESCRIPTIONS = 4  # descriptions drawn per image up front, one picked per use
N_CAPTIONS = 5  # world captions per image


def counterfactual(objs: list[Obj], rng: random.Random, colours: bool = True) -> list[Obj]:
    """The scene with one fact changed: one object's shape (most often) or colour, or two
    objects' places swapped. Described in the same words as the true scene, it is a *hard
    negative*: a text that only an image encoder seeing that very fact can tell from the right
    one. In a random batch colour alone tells most scenes apart, so without such texts the
    encoder learns little about shape."""
    objs = list(objs)
    kinds = ["shape", "shape"] + (["colour"] if colours else []) + (["swap"] if len(objs) > 1 else [])
    kind, i = rng.choice(kinds), rng.randrange(len(objs))
    o = objs[i]
    if kind == "shape" and o.colour:
        objs[i] = Obj(f"{o.colour} {rng.choice([s for s in SHAPES if s != o.kind])}", o.box)
    elif kind == "colour" and o.colour:
        objs[i] = Obj(f"{rng.choice([c for c in COLOURS if c != o.colour])} {o.kind}", o.box)
    elif kind == "swap":
        j = rng.choice([j for j in range(len(objs)) if j != i])
        objs[i], objs[j] = Obj(o.name, objs[j].box), Obj(objs[j].name, o.box)
    return objs


def description_pair(objs: list[Obj], rng: random.Random, colours: bool = True) -> tuple[str, str, list[Obj]]:
    """``(description, counterfactual description, counterfactual objects)``, the two texts worded
    alike (same order rule, same size words): they differ only where the scene was changed, or
    not at all (then no negative)."""
    seed = rng.random()
    changed = counterfactual(objs, random.Random(seed + 1), colours)
    true = object_description(objs, random.Random(seed), colours)
    false = object_description(changed, random.Random(seed), colours)
    return true, false, changed


class TextBatch(NamedTuple):
    """The texts of one batch of images: ``ids`` ``[B, L]`` paired with the images, each image's
    counterfactual text ``neg_ids`` ``[B, L]``, valid where ``neg_ok`` ``[B]`` (a description whose
    counterfactual reads differently); ``is_desc`` ``[B, 1]`` (a full description, not shape-only)
    and ``k`` ``[B]`` (which of the image's descriptions) name the counterfactual scene."""

    ids: torch.Tensor
    neg_ids: torch.Tensor
    neg_ok: torch.Tensor
    is_desc: torch.Tensor
    k: torch.Tensor


class TextBank:
    """Every pretrain image's texts as ids: ``captions`` ``[N, 5, L]``, ``descriptions``,
    ``shape_only`` and their counterfactuals ``[N, N_DESCRIPTIONS, L]``; the word-level
    ``tokenizer`` is built over all of them. ``rng`` draws the descriptions."""

    def __init__(self, captions: list[list[str]], objects: list[list[Obj]], rng: random.Random, context_length: int):
        n = len(objects)
        self.pairs = [[description_pair(o, rng) for _ in range(N_DESCRIPTIONS)] for o in objects]
        self.shape_pairs = [[description_pair(o, rng, colours=False) for _ in range(N_DESCRIPTIONS)] for o in objects]
        descs, neg_descs = ([[p[j] for p in ps] for ps in self.pairs] for j in (0, 1))
        shapes, neg_shapes = ([[p[j] for p in ps] for ps in self.shape_pairs] for j in (0, 1))
        self.tokenizer = build_tokenizer(
            [t for c in captions for t in c] + [t for d in descs + shapes + neg_descs + neg_shapes for t in d]
        )

        def ids(texts: list[list[str]]) -> torch.Tensor:  # per image a list of texts -> [N, K, L]
            return tokenize(self.tokenizer, [t for ts in texts for t in ts], context_length).view(n, len(texts[0]), -1)

        self.captions = ids([c[:N_CAPTIONS] for c in captions])
        self.descriptions, self.shape_only = ids(descs), ids(shapes)
        self.neg_descriptions, self.neg_shape_only = ids(neg_descs), ids(neg_shapes)

    def draw(self, idx: torch.Tensor, gen: torch.Generator, texts: ClipTexts) -> TextBatch:
        """The texts of images ``idx`` ``[B]``, drawn by ``gen``: a description with probability
        ``describe_prob``, a shape-only one with ``shape_prob``, else one of the world captions."""
        b = len(idx)
        u = torch.rand(b, generator=gen).unsqueeze(1)  # [B, 1]: which kind of text each image gets
        k = torch.randint(N_DESCRIPTIONS, (b,), generator=gen)  # which description (and its counterfactual)
        caption = torch.randint(N_CAPTIONS, (b,), generator=gen)
        is_desc, described = u < texts.describe_prob, u < texts.describe_prob + texts.shape_prob  # [B, 1]
        ids = torch.where(
            is_desc,
            self.descriptions[idx, k],
            torch.where(described, self.shape_only[idx, k], self.captions[idx, caption]),
        )  # [B, L]
        neg_ids = torch.where(is_desc, self.neg_descriptions[idx, k], self.neg_shape_only[idx, k])  # [B, L]
        neg_ok = described.squeeze(1) & (neg_ids != ids).any(1)  # [B]
        return TextBatch(ids, neg_ids, neg_ok, is_desc, k)

    def changed_objects(self, i: int, full: bool, k: int) -> list[Obj]:
        """The counterfactual objects of image ``i``'s ``k``-th description (``full``) or shape-only one."""
        return (self.pairs if full else self.shape_pairs)[i][k][2]
