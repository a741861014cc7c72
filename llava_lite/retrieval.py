"""Image-text retrieval: how well a CLIP matches held-out scenes to the texts that describe them.

LLaVA starts from a CLIP whose image features already line up with words; retrieval measures
that. Each image ranks the texts of its group of ``group`` scenes (1 correct among 100):

- :func:`retrieval_recall` (``captions``): each of a scene's world captions in turn against the
  same-numbered caption of the other scenes; the rounds are averaged, so every captioning style
  is scored. Many world captions fit several scenes ("A picture of three objects."), so seeing
  the image cannot settle this one: :func:`caption_truth_oracle` is what a reader that knows
  which captions are true scores;
- :func:`scene_recall` (``scenes``): each image against all captions of its group, a hit being
  any of its own (the protocol of caption datasets such as COCO);
- ``descriptions``: one text per scene naming every object (:func:`object_description`), which
  singles a scene out.

:func:`measure_clip` gathers these and the feature probes of :mod:`llava_lite.probes` for a saved
CLIP on freshly drawn held-out scenes; :func:`retrieval_table` is the table notebook 00 shows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from . import world
from .config import WorldConfig
from .facts import Obj, article
from .paths import PRETRAINED_DIR
from .probes import object_patch_probe, shape_colour_probe
from .vision import VisionTower, normalise, to_uint8

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PROTOCOLS = {
    "captions": "one world caption per scene",
    "scenes": "all five captions of each scene",
    "descriptions": "one description naming every object",
}


# ---------------------------------------------------------------- texts and scenes
def object_description(objs: list[Obj], rng: random.Random, colours: bool = True) -> str:
    """A description naming every object, with its size half the time, in random or left-right order.

    ``colours=False`` leaves the colours out (``a small circle, a square and a large triangle``):
    such texts can only be matched by an image encoder that sees shapes, which colour alone
    would otherwise let it skip.
    """

    def name(o: Obj) -> str:
        base = o.name if colours else o.kind
        return f"{rng.choice(SIZE_WORDS[o.size])} {base}" if rng.random() < 0.5 else base

    if rng.random() < 0.5:
        order, lead = sorted(objs, key=lambda o: o.cx), "From left to right: "
    else:
        order, lead = rng.sample(objs, len(objs)), rng.choice(["", "A picture of ", "There is "])
    names = [article(name(o)) for o in order]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return lead + text + "."


def heldout_scenes(
    world_cfg: WorldConfig, n: int, name: str = "heldout"
) -> tuple[torch.Tensor, list[list[str]], list[list[Obj]]]:
    """``n`` fresh scenes that appear in none of ``world_cfg``'s splits, rendered in memory.

    The world keeps every split disjoint from the ones drawn before it, so a new split named
    ``name`` drawn after all of them is held out from all of them.
    """
    cfg = WorldConfig(**{**asdict(world_cfg), "splits": {**world_cfg.splits, name: n}})
    scenes = world.sample_world(cfg)[name]
    images = torch.stack([to_uint8(world.render(s).convert("RGB")) for s in scenes])  # [N, 3, H, W]
    caps = [world.captions(s, random.Random(f"{cfg.seed}:captions:{s.image_id}")) for s in scenes]
    return images, caps, [s.objects() for s in scenes]


def heldout_descriptions(objects: list[list[Obj]], name: str = "heldout") -> list[str]:
    """One :func:`object_description` per held-out scene (every object with its colour and shape, its
    size half the time), seeded by the split's name and the scene's place in it."""
    return [object_description(objs, random.Random(f"{name}:describe:{i}")) for i, objs in enumerate(objects)]


# ---------------------------------------------------------------- the CLIP
def load_clip(folder: str | Path = PRETRAINED_DIR / "tiny-clip", device: str = "cpu"):
    """``(model, tokenizer)`` of a saved tiny CLIP, loaded through open_clip's ``local-dir:`` schema."""
    folder = Path(folder).resolve()
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no open_clip_config.json (train one with `llava-lite backbones clip`)")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
    return model.eval(), open_clip.get_tokenizer(f"local-dir:{folder}")


def encode_text(model, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` ids -> ``[B, D]`` unit text embeddings, running only up to the longest text in the batch.

    Equal to ``model.encode_text(ids, normalize=True)``: the text transformer is causal and pools
    at ``<eos>``, so the padding after the longest ``<eos>`` never changes the result.
    """
    is_eos = ids == model.text_eos_id  # [B, L]
    length = int(is_eos.int().argmax(1).max()) + 1 if bool(is_eos.any(1).all()) else ids.shape[1]
    ids = ids[:, :length]  # [B, L] -> [B, length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]  # [B, length, width]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=model.text_eos_id)  # [B, width]
    return F.normalize(x @ model.text_projection, dim=-1)  # [B, D]


# ---------------------------------------------------------------- recall
def _unit_embeddings(
    image_emb: torch.Tensor, caption_emb: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both embeddings as float unit vectors, after checking there is at least one full group."""
    if caption_emb.shape[0] < group:
        raise ValueError(f"retrieval needs at least {group} scenes, got {caption_emb.shape[0]}")
    return F.normalize(image_emb.float(), dim=-1), F.normalize(caption_emb.float(), dim=-1)


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor, caption_emb: torch.Tensor, group: int = 100, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image->caption recall@k among ``group`` candidates.

    ``image_emb``: ``[N, D]``; ``caption_emb``: ``[N, R, D]``, R captions per scene (rounds).
    Scenes beyond the last full group are left out. Only captions scored strictly higher than the
    right one count against it: an exact tie means the same text (two scenes captioned alike).
    Returns ``{"r@1": .., "r@5": .., "n": ..}``.
    """
    img, cap = _unit_embeddings(image_emb, caption_emb, group)
    n, rounds = cap.shape[0], cap.shape[1]
    hits = {k: 0 for k in ks}
    total = 0
    for start in range(0, n - group + 1, group):
        gi = img[start : start + group]  # [G, D]
        for r in range(rounds):
            gc = cap[start : start + group, r]  # [G, D]
            sim = gi @ gc.T  # [G, G]: image i vs caption j
            own = sim.diagonal().unsqueeze(1)  # [G, 1]
            rank = (sim > own).sum(dim=1)  # captions scored strictly above the right one
            for k in ks:
                hits[k] += int((rank < k).sum())
            total += group
    return {**{f"r@{k}": hits[k] / total for k in ks}, "n": total}


@torch.no_grad()
def scene_recall(
    image_emb: torch.Tensor,
    caption_emb: torch.Tensor,
    texts: Sequence[Sequence[str]],
    group: int = 100,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
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
        gc = cap[start : start + group].reshape(group * rounds, -1)  # [G*R, D]
        flat = [t for ts in texts[start : start + group] for t in ts]
        order = (img[start : start + group] @ gc.T).argsort(dim=1, descending=True)[:, : max(ks)]  # [G, K]
        for i, top in enumerate(order.tolist()):
            own = set(texts[start + i])
            first = next((r for r, j in enumerate(top) if flat[j] in own), len(top))
            for k in ks:
                hits[k] += first < k
            total += 1
    return {**{f"r@{k}": hits[k] / total for k in ks}, "n": total}


@torch.no_grad()
def embed_images(model, images_u8: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """A CLIP's image embeddings of uint8 images, on the CPU: ``[N, D]``."""
    model.eval()
    dev = next(model.parameters()).device
    pp = open_clip.get_model_preprocess_cfg(model)
    if "mean" not in pp or "std" not in pp:
        raise ValueError(
            "this CLIP carries no preprocessing (mean/std): load it with open_clip from a folder or "
            "name, or set it with open_clip.set_model_preprocess_cfg"
        )
    return torch.cat(
        [
            model.encode_image(normalise(images_u8[i : i + batch].to(dev), pp["mean"], pp["std"])).cpu()
            for i in range(0, len(images_u8), batch)
        ]
    )


@torch.no_grad()
def embed_texts(model, tokenize_fn, texts: list[str], batch: int = 500) -> torch.Tensor:
    """A CLIP's text embeddings, on the CPU: ``[N, D]``. ``tokenize_fn``: texts -> ``[N, L]`` ids
    (open_clip's tokenizer object is such a callable)."""
    model.eval()
    dev = next(model.parameters()).device
    ids = tokenize_fn(texts)  # [N, L]
    return torch.cat([encode_text(model, ids[i : i + batch].to(dev)).cpu() for i in range(0, len(ids), batch)])


def clip_retrieval(
    model, tokenize_fn, images_u8: torch.Tensor, captions: list[list[str]], group: int = 100, batch: int = 500
) -> dict[str, float]:
    """Image->caption recall@1/@5 of a CLIP, 1 in ``group`` candidates, averaged over the 5 caption rounds.

    ``tokenize_fn``: texts -> ``[N, L]`` ids (open_clip's tokenizer object is such a callable).
    """
    rounds = min(len(c) for c in captions)
    img = embed_images(model, images_u8, batch)
    txt = embed_texts(model, tokenize_fn, [c[r] for c in captions for r in range(rounds)], batch)
    return retrieval_recall(img, txt.view(len(captions), rounds, -1), group=group)


def retrieval_report(
    model, tokenize_fn, images_u8: torch.Tensor, captions: list[list[str]], descriptions: list[str], group: int = 100
) -> dict[str, dict[str, float]]:
    """Image->text retrieval among ``group`` held-out scenes, three ways (each ``{"r@1", "r@5", "n"}``):

    - ``captions``: each of a scene's world captions in turn against the same-numbered caption
      of the other scenes (:func:`retrieval_recall`). Many world captions fit
      several scenes ("A picture of three objects."), so seeing the image cannot settle this one:
      :func:`caption_truth_oracle` is what a model that knows which captions are true scores;
    - ``scenes``: each image against all captions of its group, a hit being any of its own
      (:func:`scene_recall`, the protocol of caption datasets such as COCO);
    - ``descriptions``: one description per scene naming every object (:func:`heldout_descriptions`),
      which singles a scene out.
    """
    rounds = min(len(c) for c in captions)
    texts = [list(c[:rounds]) for c in captions]
    img = embed_images(model, images_u8)
    cap = embed_texts(model, tokenize_fn, [t for ts in texts for t in ts]).view(len(texts), rounds, -1)
    desc = embed_texts(model, tokenize_fn, descriptions).unsqueeze(1)  # [N, 1, D]
    return {
        "captions": retrieval_recall(img, cap, group=group),
        "scenes": scene_recall(img, cap, texts, group=group),
        "descriptions": retrieval_recall(img, desc, group=group),
    }


def true_captions(objs: list[Obj], draws: int = 300) -> set[str]:
    """Captions the world's captioners write for a scene with these objects, in ``draws`` random
    draws each: a sample of the captions true of it."""
    out = set()
    for cap in world.CAPTIONERS:
        out.update(t for d in range(draws) if (t := world.finish_caption(cap, cap(objs, random.Random(d)))))
    return out


def shared_caption(
    objects: list[list[Obj]], captions: list[list[str]], i: int = 0, draws: int = 100
) -> tuple[int, int] | None:
    """``(r, j)``: the first caption ``r`` of scene ``i`` (in caption order) that is also true of
    another scene ``j`` of ``objects`` (by :func:`true_captions`), or ``None``."""
    true: dict[int, set[str]] = {}
    for r, text in enumerate(captions[i]):
        for j in range(len(objects)):
            if j == i:
                continue
            if j not in true:
                true[j] = true_captions(objects[j], draws)
            if text in true[j]:
                return r, j
    return None


def caption_truth_oracle(
    objects: list[list[Obj]], captions: list[list[str]], group: int = 100, draws: int = 300
) -> dict[str, float]:
    """What the ``captions`` protocol of :func:`retrieval_report` gives a reader that knows
    exactly which captions are true of an image and picks at random among them.

    A caption counts as true of a scene when one of the world's captioners writes it for that
    scene in one of ``draws`` random draws each (a sample of everything they could write, so
    this finds *fewer* true rivals than there are: the scores are upper bounds). Returns the
    oracle's expected recall@1, the share of queries with no true rival, and ``coverage``:
    the share of the scenes' own captions the sample found (how complete it is).
    """
    rounds = min(len(c) for c in captions)
    true = [true_captions(objs, draws) for objs in objects]
    expected = alone = total = 0.0
    for start in range(0, len(captions) - group + 1, group):
        for r in range(rounds):
            cands = {captions[j][r] for j in range(start, start + group)}
            for i in range(start, start + group):
                rivals = sum(1 for c in cands if c != captions[i][r] and c in true[i])
                expected += 1 / (1 + rivals)
                alone += rivals == 0
                total += 1
    covered = sum(c in true[i] for i, cs in enumerate(captions) for c in cs) / sum(len(cs) for cs in captions)
    return {"r@1": expected / total, "no_true_rival": alone / total, "coverage": covered, "n": int(total)}


def measure_clip(folder: Path, world_cfg: WorldConfig, n: int = 1000, name: str = "heldout") -> dict:
    """Retrieval and probes of a saved tiny CLIP on ``n`` freshly drawn held-out scenes."""
    images, caps, objs = heldout_scenes(world_cfg, n, name)
    model, tokenizer = load_clip(folder)
    report = retrieval_report(model, tokenizer, images, caps, heldout_descriptions(objs, name))
    out = {
        "heldout_scenes": n,
        "retrieval": report["captions"],
        "retrieval_scenes": report["scenes"],
        "retrieval_descriptions": report["descriptions"],
        "caption_truth_oracle": caption_truth_oracle(objs, caps),
    }
    for layer in (-2, -1):
        tower = VisionTower.load(str(folder), layer=layer)
        tokens = tower.encode(images)  # [N, P, D]
        out[f"probe_layer{layer}"] = shape_colour_probe(tower, images, objs, tokens)
        if layer == -2:  # the layer LLaVA reads
            out["patch_probe_layer-2"] = object_patch_probe(tower, images, objs, tokens)
    return out


def retrieval_table(
    model,
    tokenize_fn,
    images_u8: torch.Tensor,
    captions: list[list[str]],
    objects: list[list[Obj]],
    name: str = "heldout",
    truth_draws: int = 100,
) -> list[dict]:
    """One row per protocol of :func:`retrieval_report` (recall@1 and @5, 1 of 100 scenes), then the
    truth reader's row for the ``captions`` protocol (its first group of 100 scenes) and chance."""
    report = retrieval_report(model, tokenize_fn, images_u8, captions, heldout_descriptions(objects, name))
    rows = [
        {"texts ranked": label, "recall@1": round(report[k]["r@1"], 3), "recall@5": round(report[k]["r@5"], 3)}
        for k, label in PROTOCOLS.items()
    ]
    truth = caption_truth_oracle(objects[:100], captions[:100], draws=truth_draws)
    rows.append(
        {
            "texts ranked": f"{PROTOCOLS['captions']}, a reader that knows which captions are true "
            f"({truth['no_true_rival']:.0%} of its queries have no true rival)",
            "recall@1": round(truth["r@1"], 3),
            "recall@5": "—",
        }
    )
    rows.append({"texts ranked": "chance", "recall@1": 0.01, "recall@5": 0.05})
    return rows
