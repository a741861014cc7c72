"""Pretrain a tiny CLIP (open_clip's architecture) contrastively on the shapes world.

LLaVA starts from OpenAI's CLIP; the ``tiny`` preset starts from this one, trained by
``llava-lite backbones clip`` on the world's ``pretrain`` split and shipped under
``data/pretrained/tiny-clip/`` in the layout open_clip reads::

    open_clip_config.json        model_cfg + preprocess_cfg
    open_clip_model.safetensors  the weights
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   a word-level tokenizer

so ``open_clip.create_model_and_transforms("local-dir:data/pretrained/tiny-clip")`` and
``open_clip.get_tokenizer("local-dir:data/pretrained/tiny-clip")`` load it like any model.
Beside them: ``README.md`` (command, seed, wall time, metrics), ``train_log.jsonl``,
``loss.png`` and ``metrics.json``.

Each step pairs every image with one text: one of its five world captions, or (with
probability ``describe_prob``) a description naming every object, which forces the image
encoder to keep the shape and colour of each object, not only the most salient one.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import coco, io, world
from .config import WorldConfig, get_preset
from .envcheck import training_device
from .facts import COLOURS, SHAPES, Obj, article
from .paths import PRETRAINED_DIR, Layout
from .probes import linear_probe, retrieval_recall, scene_labels, scene_recall

log = logging.getLogger(__name__)

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}


@dataclass
class ClipTrainConfig:
    """Everything that decides the tiny CLIP; the README records it."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 40
    embed_dim: int = 128
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    init_temperature: float = 0.07
    describe_prob: float = 0.3  # share of texts naming every object with colour, shape and size
    shape_prob: float = 0.3  # share naming every object by shape and size only (the rest: world captions)
    hard_negatives: bool = True  # each description also scored against its counterfactual (see counterfactual())
    counterfactual_images: bool = False  # the counterfactual scene drawn too, and added to the batch with its description
    init: str = ""  # a saved tiny CLIP to start from (same architecture and vocabulary); "" = random weights
    bf16: bool = True  # autocast the forward pass to bfloat16 (about 2x faster on AVX512-BF16 CPUs)
    seed: int = 0
    threads: int = 0  # CPU threads (0: torch's default); 1 is faster when another job shares 2 cores
    device: str = "cpu"  # "cuda": train on a GPU (images are still drawn on the CPU)
    eval_every: int = 250
    eval_scenes: int = 500  # held-out scenes scored while training (retrieval, 1 in 100)
    metric_scenes: int = 1000  # held-out scenes for the final metrics
    world: dict = field(default_factory=lambda: asdict(WorldConfig()))


# ---------------------------------------------------------------- text
def describe(objs: list[Obj], rng: random.Random, colours: bool = True) -> str:
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
    true = describe(objs, random.Random(seed), colours)
    false = describe(changed, random.Random(seed), colours)
    return true, false, changed


def build_tokenizer(texts: list[str]):
    """A lower-cased word-level tokenizer over ``texts`` (the world has ~80 words) as a HF fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS], min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS)


def tokenize(tokenizer, texts: list[str], context_length: int) -> torch.Tensor:
    """``[N, context_length]`` ids, padded and truncated as open_clip's HFTokenizer does."""
    return tokenizer(texts, return_tensors="pt", max_length=context_length, padding="max_length",
                     truncation=True).input_ids


# ---------------------------------------------------------------- model
def model_config(cfg: ClipTrainConfig, tokenizer) -> dict:
    """open_clip's ``model_cfg`` for the tiny CLIP (text pooled at the ``<eos>`` token)."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                       "layers": cfg.vision_layers, "head_width": cfg.vision_head_width, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": len(tokenizer), "width": cfg.text_width,
                     "heads": cfg.text_heads, "layers": cfg.text_layers, "pool_type": "eos",
                     "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
                     "hf_tokenizer_name": "local tokenizer.json (word level)"},
    }


def encode_text(model, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` ids -> ``[B, D]`` unit text embeddings, running only up to the longest text in the batch.

    Equal to ``model.encode_text(ids, normalize=True)``: the text transformer is causal and pools
    at ``<eos>``, so the padding after the longest ``<eos>`` never changes the result.
    """
    from open_clip.transformer import text_global_pool

    is_eos = ids == model.text_eos_id  # [B, L]
    length = int(is_eos.int().argmax(1).max()) + 1 if bool(is_eos.any(1).all()) else ids.shape[1]
    ids = ids[:, :length]  # [B, L] -> [B, length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]  # [B, length, width]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=model.text_eos_id)  # [B, width]
    return F.normalize(x @ model.text_projection, dim=-1)  # [B, D]


def build_model(model_cfg: dict, cfg: ClipTrainConfig):
    import open_clip

    model = open_clip.CLIP(**model_cfg)
    model.logit_scale.data.fill_(math.log(1 / cfg.init_temperature))
    return model


def load_tiny_clip(folder: str | Path = PRETRAINED_DIR / "tiny-clip", device: str = "cpu"):
    """``(model, tokenizer)`` of a saved tiny CLIP, loaded through open_clip's ``local-dir:`` schema."""
    import open_clip

    folder = Path(folder).resolve()
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no open_clip_config.json (train one with `llava-lite backbones clip`)")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
    return model.eval(), open_clip.get_tokenizer(f"local-dir:{folder}")


# ---------------------------------------------------------------- data
def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 -> CLIP-normalised float (OpenAI mean/std, as the tower does)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255 - mean) / std


def _to_u8(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]


def load_split(world_dir: Path, split: str) -> tuple[torch.Tensor, list[list[str]], list[list[Obj]]]:
    """A world split as ``([N, 3, H, W]`` uint8 images, captions per image, objects per image)."""
    from .vision import load_image

    contexts = coco.load_contexts(world_dir / "annotations" / f"instances_{split}.json",
                                  world_dir / "annotations" / f"captions_{split}.json")
    images = torch.stack([_to_u8(load_image(world_dir / split / c.file_name))
                          for c in tqdm(contexts, desc=f"load {split}", unit="img")])
    return images, [c.captions for c in contexts], [c.objects for c in contexts]


def heldout_scenes(world_cfg: WorldConfig, n: int, name: str = "heldout") -> tuple[torch.Tensor, list[list[str]], list[list[Obj]]]:
    """``n`` fresh scenes that appear in none of ``world_cfg``'s splits, rendered in memory.

    The world keeps every split disjoint from the ones drawn before it, so a new split named
    ``name`` drawn after all of them is held out from all of them.
    """
    cfg = WorldConfig(**{**asdict(world_cfg), "splits": {**world_cfg.splits, name: n}})
    scenes = world.sample_world(cfg)[name]
    images = torch.stack([_to_u8(world.render(s)) for s in scenes])
    caps = [world.captions(s, random.Random(f"{cfg.seed}:captions:{s.image_id}")) for s in scenes]
    return images, caps, [s.objects() for s in scenes]


def heldout_descriptions(objects: list[list[Obj]], name: str = "heldout") -> list[str]:
    """One :func:`describe` text per held-out scene (every object with its colour and shape, its
    size half the time), seeded by the split's name and the scene's place in it."""
    return [describe(objs, random.Random(f"{name}:describe:{i}")) for i, objs in enumerate(objects)]


# ---------------------------------------------------------------- metrics
@torch.no_grad()
def embed_images(model, images_u8: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """A CLIP's image embeddings of uint8 images, on the CPU: ``[N, D]``."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model.encode_image(normalise(images_u8[i:i + batch].to(dev))).cpu()
                      for i in range(0, len(images_u8), batch)])


@torch.no_grad()
def embed_texts(model, tokenize_fn, texts: list[str], batch: int = 500) -> torch.Tensor:
    """A CLIP's text embeddings, on the CPU: ``[N, D]``. ``tokenize_fn``: texts -> ``[N, L]`` ids
    (open_clip's tokenizer object is such a callable)."""
    model.eval()
    dev = next(model.parameters()).device
    ids = tokenize_fn(texts)  # [N, L]
    return torch.cat([encode_text(model, ids[i:i + batch].to(dev)).cpu() for i in range(0, len(ids), batch)])


def clip_retrieval(model, tokenize_fn, images_u8: torch.Tensor, captions: list[list[str]],
                   group: int = 100, batch: int = 500) -> dict[str, float]:
    """Image->caption recall@1/@5 of a CLIP, 1 in ``group`` candidates, averaged over the 5 caption rounds.

    ``tokenize_fn``: texts -> ``[N, L]`` ids (open_clip's tokenizer object is such a callable).
    """
    rounds = min(len(c) for c in captions)
    img = embed_images(model, images_u8, batch)
    txt = embed_texts(model, tokenize_fn, [c[r] for c in captions for r in range(rounds)], batch)
    return retrieval_recall(img, txt.view(len(captions), rounds, -1), group=group)


def retrieval_report(model, tokenize_fn, images_u8: torch.Tensor, captions: list[list[str]],
                     descriptions: list[str], group: int = 100) -> dict[str, dict[str, float]]:
    """Image->text retrieval among ``group`` held-out scenes, three ways (each ``{"r@1", "r@5", "n"}``):

    - ``captions``: each of a scene's world captions in turn against the same-numbered caption
      of the other scenes (:func:`~llava_lite.probes.retrieval_recall`). Many world captions fit
      several scenes ("A picture of three objects."), so seeing the image cannot settle this one:
      :func:`caption_truth_oracle` is what a model that knows which captions are true scores;
    - ``scenes``: each image against all captions of its group, a hit being any of its own
      (:func:`~llava_lite.probes.scene_recall`, the protocol of caption datasets such as COCO);
    - ``descriptions``: one description per scene naming every object (:func:`heldout_descriptions`),
      which singles a scene out as the issue's naive baseline's template captions did.
    """
    rounds = min(len(c) for c in captions)
    texts = [list(c[:rounds]) for c in captions]
    img = embed_images(model, images_u8)
    cap = embed_texts(model, tokenize_fn, [t for ts in texts for t in ts]).view(len(texts), rounds, -1)
    desc = embed_texts(model, tokenize_fn, descriptions).unsqueeze(1)  # [N, 1, D]
    return {"captions": retrieval_recall(img, cap, group=group),
            "scenes": scene_recall(img, cap, texts, group=group),
            "descriptions": retrieval_recall(img, desc, group=group)}


def true_captions(objs: list[Obj], draws: int = 300) -> set[str]:
    """Captions the world's captioners write for a scene with these objects, in ``draws`` random
    draws each: a sample of the captions true of it."""
    out = set()
    for cap in world.CAPTIONERS:
        out.update(t for d in range(draws) if (t := world.finish_caption(cap, cap(objs, random.Random(d)))))
    return out


def shared_caption(objects: list[list[Obj]], captions: list[list[str]], i: int = 0,
                   draws: int = 100) -> tuple[int, int] | None:
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


def caption_truth_oracle(objects: list[list[Obj]], captions: list[list[str]], group: int = 100,
                         draws: int = 300) -> dict[str, float]:
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


@torch.no_grad()
def patch_tokens(tower, images_u8: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """A :class:`~llava_lite.vision.VisionTower`'s patch tokens for uint8 images: ``[N, P, width]``."""
    return torch.cat([tower((images_u8[i:i + batch].float() / 255 - tower.mean) / tower.std)  # [B, 3, S, S] in
                      for i in range(0, len(images_u8), batch)])


def pooled_patch_features(tower, images_u8: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Mean of a tower's patch tokens per image: ``[N, width]``."""
    return patch_tokens(tower, images_u8, batch).mean(dim=1)


def shape_colour_probe(tower, images_u8: torch.Tensor, objects: list[list[Obj]],
                       tokens: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Linear probes on pooled patch features: which shapes / colours a scene holds.

    The first half of the scenes trains the probe, the second half scores it. ``tokens``: the
    tower's patch tokens of ``images_u8``, if already computed.
    """
    feats = (patch_tokens(tower, images_u8) if tokens is None else tokens).mean(dim=1)  # [N, W]
    labels = scene_labels(objects)
    h = len(feats) // 2
    return {k: linear_probe(feats[:h], y[:h], feats[h:], y[h:]) for k, y in labels.items()}


def measure(folder: Path, world_cfg: WorldConfig, n: int = 1000, name: str = "heldout") -> dict:
    """Retrieval and probes of a saved tiny CLIP on ``n`` freshly drawn held-out scenes."""
    from .vision import VisionTower

    images, caps, objs = heldout_scenes(world_cfg, n, name)
    model, tokenizer = load_tiny_clip(folder)
    report = retrieval_report(model, tokenizer, images, caps, heldout_descriptions(objs, name))
    out = {"heldout_scenes": n, "retrieval": report["captions"], "retrieval_scenes": report["scenes"],
           "retrieval_descriptions": report["descriptions"], "caption_truth_oracle": caption_truth_oracle(objs, caps)}
    for layer in (-2, -1):
        tower = VisionTower.load(str(folder), layer=layer)
        tokens = patch_tokens(tower, images)  # [N, P, D]
        out[f"probe_layer{layer}"] = shape_colour_probe(tower, images, objs, tokens)
        if layer == -2:  # the layer LLaVA reads
            out["patch_probe_layer-2"] = object_patch_probe(tower, images, objs, tokens)
    return out


def object_patch_probe(tower, images_u8: torch.Tensor, objects: list[list[Obj]],
                       tokens: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Per-patch probes: does one patch token tell the colour, shape and size of the object under
    it? (What stage 2 needs to pick an object out by one attribute and read off another.) Fitted
    on the first half of the scenes, scored on the object patches of the second half."""
    from .patches import patch_labels, patch_probe

    x = patch_tokens(tower, images_u8) if tokens is None else tokens  # [N, P, D]
    h, out = len(x) // 2, {}
    for attr in ("colour", "shape", "size"):
        y = patch_labels(objects, tower.grid, attr)  # [N, P]
        obj = y[h:] != 0
        majority = torch.bincount(y[:h][y[:h] != 0]).argmax()
        r = patch_probe(x[:h], y[:h], x[h:], y[h:])
        out[attr] = {"accuracy": r["object_patches"], "majority": (y[h:][obj] == majority).float().mean().item()}
    return out


# ---------------------------------------------------------------- training
def _lr_at(step: int, cfg: ClipTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor,
                     neg: torch.Tensor | None = None, neg_ok: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch; identical texts in a batch all count as right answers.

    ``neg`` ``[B, D]``: each image's own hard-negative text, one more wrong choice in its
    image->text row where ``neg_ok`` ``[B]`` is true."""
    logits = scale * img @ txt.T  # [B, B]
    same = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1).float()  # [B, B]: text i == text j
    target = same / same.sum(1, keepdim=True)
    i2t, i2t_target = logits, target
    if neg is not None:
        extra = (scale * (img * neg).sum(-1, keepdim=True)).masked_fill(~neg_ok.unsqueeze(1), -1e4)  # [B, 1] (finite: 0 * -inf is nan)
        i2t = torch.cat([logits, extra], 1)  # [B, B + 1]
        i2t_target = torch.cat([target, torch.zeros_like(extra)], 1)
    return 0.5 * (F.cross_entropy(i2t, i2t_target) + F.cross_entropy(logits.T, target))


def train(cfg: ClipTrainConfig, world_dir: Path, out: Path, command: str = "", data=None) -> dict:
    """Train on ``world_dir``'s pretrain split and write the shipped folder ``out``.

    ``data``: the split as :func:`load_split` returns it, if already in memory.
    """
    dev = training_device(cfg.device)  # before any loading: a missing GPU fails at once
    torch.set_flush_denormal(True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    world_cfg = WorldConfig(**cfg.world)
    t_start = time.time()

    images, caps, objs = data or load_split(world_dir, "pretrain")  # [N, 3, H, W] uint8
    n = len(images)
    n_desc = 4  # descriptions drawn per image up front, one picked per use
    pairs = [[description_pair(o, rng) for _ in range(n_desc)] for o in objs]
    shape_pairs = [[description_pair(o, rng, colours=False) for _ in range(n_desc)] for o in objs]
    descs, neg_descs = [[p[0] for p in ps] for ps in pairs], [[p[1] for p in ps] for ps in pairs]
    shape_descs, neg_shape = [[p[0] for p in ps] for ps in shape_pairs], [[p[1] for p in ps] for ps in shape_pairs]
    scenes = pretrain_scenes(world_cfg, objs) if cfg.counterfactual_images else None
    tokenizer = build_tokenizer([t for c in caps for t in c] + [t for d in descs + shape_descs + neg_descs + neg_shape
                                                               for t in d])
    cap_ids = tokenize(tokenizer, [t for c in caps for t in c[:5]], cfg.context_length).view(n, 5, -1)  # [N, 5, L]
    desc_ids = tokenize(tokenizer, [t for d in descs for t in d], cfg.context_length).view(n, n_desc, -1)
    shape_ids = tokenize(tokenizer, [t for d in shape_descs for t in d], cfg.context_length).view(n, n_desc, -1)
    neg_desc_ids = tokenize(tokenizer, [t for d in neg_descs for t in d], cfg.context_length).view(n, n_desc, -1)
    neg_shape_ids = tokenize(tokenizer, [t for d in neg_shape for t in d], cfg.context_length).view(n, n_desc, -1)
    ev_images, ev_caps, _ = heldout_scenes(world_cfg, cfg.eval_scenes, "clip-eval")

    mcfg = model_config(cfg, tokenizer)
    model = build_model(mcfg, cfg)
    if cfg.init:
        load_init(model, mcfg, tokenizer, Path(cfg.init))
    model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny CLIP: %.2fM parameters, %d pretrain images, vocabulary %d", n_params / 1e6, n, len(tokenizer))
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    log_rows = []
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    t_train = time.time()
    bar = tqdm(range(cfg.steps), desc="tiny CLIP", unit="step")
    for step in bar:
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        b = len(idx)
        u = torch.rand(b, generator=gen).unsqueeze(1)  # which kind of text each image gets
        k = torch.randint(n_desc, (b,), generator=gen)  # which description (and its counterfactual)
        is_desc, described = u < cfg.describe_prob, u < cfg.describe_prob + cfg.shape_prob  # [B, 1]
        ids = torch.where(is_desc, desc_ids[idx, k],
                          torch.where(described, shape_ids[idx, k], cap_ids[idx, torch.randint(5, (b,), generator=gen)]))  # [B, L]
        neg_ids = torch.where(is_desc, neg_desc_ids[idx, k], neg_shape_ids[idx, k])  # [B, L]
        neg_ok = described.squeeze(1) & (neg_ids != ids).any(1)  # a description whose counterfactual reads differently
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        model.train()
        batch_u8 = images[idx]
        if scenes is not None and neg_ok.any():
            # the counterfactual scenes join the batch as pairs of their own: each true text is then
            # a hard negative for its twin image, and each twin text for the true image
            sel = neg_ok.nonzero().squeeze(1).tolist()
            twins = [world.with_objects(scenes[idx[j]], (pairs if is_desc[j] else shape_pairs)[idx[j]][k[j]][2],
                                        random.Random(f"{cfg.seed}:{step}:{j}")) for j in sel]
            batch_u8 = torch.cat([batch_u8, torch.stack([_to_u8(world.render(t)) for t in twins])])
            ids = torch.cat([ids, neg_ids[sel]])
            neg_ok = torch.zeros_like(neg_ok)  # the twins' texts are in the batch already
        batch_u8, ids, neg_ids, neg_ok = batch_u8.to(dev), ids.to(dev), neg_ids.to(dev), neg_ok.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            img = model.encode_image(normalise(batch_u8), normalize=True)  # [B(+twins), D]
            txt = encode_text(model, ids)  # [B(+twins), D]
            neg = encode_text(model, neg_ids[neg_ok]) if cfg.hard_negatives and neg_ok.any() else None  # [b', D]
        if neg is not None:
            neg = torch.zeros_like(txt, dtype=neg.dtype).index_put((neg_ok.nonzero().squeeze(1),), neg)  # [B, D]
        loss = contrastive_loss(img.float(), txt.float(), ids, model.logit_scale.exp(),
                                None if neg is None else neg.float(), neg_ok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        row = {"step": step + 1, "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"],
               "temperature": round(1 / model.logit_scale.exp().item(), 4), "elapsed_s": round(time.time() - t_train, 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            r = clip_retrieval(model, lambda t: tokenize(tokenizer, t, cfg.context_length), ev_images, ev_caps)
            row.update({"eval_r@1": round(r["r@1"], 4), "eval_r@5": round(r["r@5"], 4)})
            log.info("step %d loss %.3f held-out r@1 %.3f r@5 %.3f", step + 1, row["loss"], r["r@1"], r["r@5"])
        log_rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    train_s = time.time() - t_train

    save(model.cpu().eval(), mcfg, tokenizer, out)
    metrics = measure(out, world_cfg, cfg.metric_scenes)
    metrics.update({"parameters": n_params, "train_seconds": round(train_s, 1),
                    "ms_per_step": round(1000 * train_s / cfg.steps, 1),
                    "total_seconds": round(time.time() - t_start, 1), "config": asdict(cfg),
                    "threads": torch.get_num_threads()})
    io.write_json(out / "metrics.json", metrics, indent=2)
    io.write_text(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log_rows))
    plot_log(log_rows, out / "loss.png")
    io.write_text(out / "README.md", readme(cfg, metrics, command))
    return metrics


def pretrain_scenes(world_cfg: WorldConfig, objs: list[list[Obj]]) -> list[world.Scene]:
    """The pretrain split's scenes (tints and background included), drawn again from the world's
    seed and checked against the objects read from disk, so counterfactual twins can be drawn."""
    scenes = world.sample_world(world_cfg)["pretrain"]
    tol = 0.5 / world_cfg.image_size
    for i, (scene, want) in enumerate(zip(scenes, objs)):
        got = scene.objects()
        if len(got) != len(want) or any(a.name != b.name or max(abs(x - y) for x, y in zip(a.box, b.box)) > tol
                                        for a, b in zip(got, want)):
            raise ValueError(f"pretrain scene #{i} (image {scene.image_id}) on disk is not the one the world config "
                             f"draws (expected {[o.name for o in got]}, found {[o.name for o in want]}): regenerate "
                             "the world with this preset, or pass --world for the folder made with it")
    if len(scenes) != len(objs):
        raise ValueError(f"the world config draws {len(scenes)} pretrain scenes, the folder has {len(objs)}")
    return scenes


def load_init(model, mcfg: dict, tokenizer, folder: Path) -> None:
    """Start from a saved tiny CLIP: same architecture, same vocabulary (else a clear error)."""
    from safetensors.torch import load_file

    saved = io.read_json(folder / "open_clip_config.json")["model_cfg"]
    if saved != mcfg:
        diff = {k: (saved.get(k), mcfg.get(k)) for k in set(saved) | set(mcfg) if saved.get(k) != mcfg.get(k)}
        raise ValueError(f"{folder}/open_clip_config.json: another architecture (saved, wanted): {diff}")
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    if vocab != tokenizer.get_vocab():
        raise ValueError(f"{folder}/tokenizer.json: its vocabulary differs from this run's texts' "
                         f"({len(vocab)} vs {len(tokenizer.get_vocab())} words); start from a model trained on this world")
    model.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")))
    log.info("starting from %s", folder)


def save(model, mcfg: dict, tokenizer, out: Path) -> None:
    """Weights (safetensors), open_clip config and tokenizer files, each written atomically."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with io.atomic_path(out / "open_clip_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    io.write_json(out / "open_clip_config.json", {
        "model_cfg": mcfg,
        "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"}}, indent=2)
    tmp_dir = out / ".tokenizer.tmp"
    tokenizer.save_pretrained(tmp_dir)
    for f in tmp_dir.iterdir():
        f.replace(out / f.name)
    tmp_dir.rmdir()


def plot_log(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
    ax[0].set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ev = [r for r in rows if "eval_r@1" in r]
    ax[1].plot([r["step"] for r in ev], [r["eval_r@1"] for r in ev], "o-", label="recall@1")
    ax[1].plot([r["step"] for r in ev], [r["eval_r@5"] for r in ev], "s-", label="recall@5")
    ax[1].set(xlabel="step", ylim=(0, 1), title="held-out retrieval (1 in 100)")
    ax[1].legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def readme(cfg: ClipTrainConfig, m: dict, command: str) -> str:
    p2, p1 = m["probe_layer-2"], m["probe_layer-1"]
    ways = {"retrieval_descriptions": "a description naming every object", "retrieval_scenes":
            "any of a scene's 5 world captions, all 500 of the group ranked", "retrieval": "one world caption per scene"}
    retrieval_rows = "".join(f"| image->text recall@1 / @5, 1 of 100 scenes: {label} | {m[k]['r@1']:.3f} / {m[k]['r@5']:.3f} |\n"
                             for k, label in ways.items() if k in m)
    if "caption_truth_oracle" in m:
        o = m["caption_truth_oracle"]
        retrieval_rows += (f"| the last row for a reader that knows which captions are true (at most; "
                           f"{o['no_true_rival']:.0%} of its queries have no true rival) | {o['r@1']:.3f} |\n")
    patch_rows = "".join(f"| {a} of the object under one patch, layer -2 | {v['accuracy']:.3f} (majority {v['majority']:.3f}) |\n"
                         for a, v in m.get("patch_probe_layer-2", {}).items())
    return f"""# tiny-clip

A {m['parameters'] / 1e6:.2f}M-parameter CLIP in open_clip's architecture (ViT {cfg.image_size} px,
patch {cfg.patch_size}, width {cfg.vision_width}, {cfg.vision_layers} layers; text transformer width
{cfg.text_width}, {cfg.text_layers} layers, word-level tokenizer), trained contrastively by
llava-lite on the shapes world's `pretrain` split. Load it with

```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:data/pretrained/tiny-clip")
tokenizer = open_clip.get_tokenizer("local-dir:data/pretrained/tiny-clip")
```

or as LLaVA's vision tower: `llava_lite.vision.VisionTower.load("tiny-clip")`.

## How it was made
```
{command}
```
seed {cfg.seed}; {cfg.steps} steps of batch {cfg.batch_size}; AdamW lr {cfg.lr}, weight decay
{cfg.weight_decay}, {cfg.warmup_steps} warmup steps then cosine; bf16 autocast {cfg.bf16};
{int(cfg.describe_prob * 100)}% of texts are a description naming every object (colour, shape, size),
{int(cfg.shape_prob * 100)}% one naming every object by shape and size only, the rest one of the
world's five captions{"; each description also scored against its counterfactual (one shape, colour or place changed)" if cfg.hard_negatives else ""}{"; the counterfactual scene was also drawn and put in the batch with its description, so each true text is a hard negative for its twin image" if cfg.counterfactual_images else ""}.{f" Training started from the tiny CLIP then in `{cfg.init}` (`LAB.md` has how that one was made), not from random weights." if cfg.init else ""} Training took {m['train_seconds'] / 60:.1f} min ({m['ms_per_step']} ms/step,
torch threads: {m['threads']}); {m['total_seconds'] / 60:.1f} min in all with loading and measuring.
`train_log.jsonl` has every step, `loss.png` the curves, `metrics.json` the numbers below.

## Measured on {m['heldout_scenes']} freshly drawn held-out scenes
| metric | value |
|---|---|
{retrieval_rows}| shape probe, layer -2 (pooled patches; per scene-shape pair) | {p2['shape']['accuracy']:.3f} (majority {p2['shape']['majority']:.3f}) |
| colour probe, layer -2 | {p2['colour']['accuracy']:.3f} (majority {p2['colour']['majority']:.3f}) |
| shape probe, layer -1 | {p1['shape']['accuracy']:.3f} |
| colour probe, layer -1 | {p1['colour']['accuracy']:.3f} |
{patch_rows}
Probes: logistic regression on the mean of the patch tokens (per-patch rows: on single patch
tokens), trained on half the held-out scenes and scored on the other half. An untrained model scores recall@1 ~0.01.
Retrieval: each image ranks the texts of its group of 100 scenes. Many world captions fit several
scenes ("A picture of three objects."), so with one caption per scene, seeing the image cannot say which
of two true captions is its own (see the truth-reader row); the description, which names every object, singles its scene out.

`LAB.md` (kept by hand) has the runs that led to these settings, and what moved the numbers.
"""


# ---------------------------------------------------------------- command line
def register_cli_clip(sub) -> None:
    """Add ``clip`` to the ``llava-lite backbones`` sub-commands."""
    d = ClipTrainConfig()
    p = sub.add_parser("clip", help="pretrain the tiny CLIP on the world's pretrain split")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--world", help="world folder (default: outputs/<preset>/world, generated if missing)")
    p.add_argument("--out", default=str(PRETRAINED_DIR / "tiny-clip"))
    for name in ("steps", "batch_size", "patch_size", "vision_width", "vision_layers", "text_layers", "seed", "threads",
                 "eval_every", "metric_scenes"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "describe_prob", "shape_prob", "init_temperature"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--device", default=d.device, help="cpu, or cuda to train on a GPU")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                   help="score each description against the batch only, not also against its counterfactual")
    p.add_argument("--counterfactual-images", action="store_true",
                   help="also draw each counterfactual scene and add it to the batch with its description")
    p.add_argument("--init", default="", help="a saved tiny CLIP to start from (same architecture and texts)")

    def run(args):
        preset = get_preset(args.preset)
        world_dir = Path(args.world) if args.world else Layout.for_preset(args.preset).world
        if not (world_dir / "annotations" / "instances_pretrain.json").exists():
            log.info("no pretrain split in %s: generating the world", world_dir)
            world.generate(preset.world, world_dir)
        fields = {k: getattr(args, k) for k in asdict(d) if hasattr(args, k) and k != "world"}
        cfg = ClipTrainConfig(**{**fields, "world": asdict(preset.world)})
        command = "llava-lite backbones clip " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in fields.items()
            if k not in ("bf16", "hard_negatives", "counterfactual_images", "init"))
        command += ("" if cfg.bf16 else " --no-bf16") + ("" if cfg.hard_negatives else " --no-hard-negatives")
        command += (" --counterfactual-images" if cfg.counterfactual_images else "") + (f" --init {cfg.init}" if cfg.init else "")
        command += f" --preset {args.preset}" + (f" --world {args.world}" if args.world else "")
        m = train(cfg, world_dir, Path(args.out), command)
        log.info("tiny CLIP written to %s: r@1 %.3f, shape probe %.3f", args.out, m["retrieval"]["r@1"],
                 m["probe_layer-2"]["shape"]["accuracy"])

    p.set_defaults(func=run)
