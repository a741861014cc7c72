"""Pretrain the tiny CLIP (open_clip's architecture) contrastively on the shapes world.

LLaVA starts from OpenAI's CLIP; the ``tiny`` preset starts from this one, trained by
``llava-lite backbones clip`` on the world's ``pretrain`` split and shipped under
``data/pretrained/tiny-clip/`` in the layout open_clip reads::

    open_clip_config.json        model_cfg + preprocess_cfg
    open_clip_model.safetensors  the weights
    tokenizer.json, tokenizer_config.json   a word-level tokenizer

so ``open_clip.create_model_and_transforms("local-dir:data/pretrained/tiny-clip")`` and
``open_clip.get_tokenizer("local-dir:data/pretrained/tiny-clip")`` load it like any model.
Beside them: ``README.md`` (command, seed, wall time, metrics), ``train_log.jsonl``,
``loss.png`` and ``metrics.json``. The texts each image is paired with, and their hard
negatives, are :mod:`llava_lite.lab.clip_texts`; the measures, :func:`llava_lite.retrieval.measure_clip`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import coco, io, jsonl
from ..config import WorldConfig, get_preset
from ..envcheck import training_device
from ..facts import Obj
from ..paths import Layout
from ..retrieval import clip_retrieval, encode_text, heldout_scenes, measure_clip
from ..train import lr_factor
from ..vision import load_image, normalise, to_uint8
from ..world import Scene, generate, render, sample_world, with_objects
from .cards import clip_card, plot_log
from .clip_texts import TextBank, TextBatch
from .config import ClipArchitecture, ClipRuntime, ClipTexts, ClipTraining, flat
from .tokenizers import tokenize

log = logging.getLogger(__name__)

# the tiny CLIP normalises its pixels as OpenAI's CLIP does; the model carries this and saves it
MEAN, STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
PREPROCESS = {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}


# ---------------------------------------------------------------- the model
def model_config(arch: ClipArchitecture, tokenizer) -> dict:
    """open_clip's ``model_cfg`` for the tiny CLIP (text pooled at the ``<eos>`` token)."""
    return {
        "embed_dim": arch.embed_dim,
        "vision_cfg": {
            "image_size": arch.image_size,
            "patch_size": arch.patch_size,
            "width": arch.vision_width,
            "layers": arch.vision_layers,
            "head_width": arch.vision_head_width,
            "mlp_ratio": 4.0,
        },
        "text_cfg": {
            "context_length": arch.context_length,
            "vocab_size": len(tokenizer),
            "width": arch.text_width,
            "heads": arch.text_heads,
            "layers": arch.text_layers,
            "pool_type": "eos",
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
            "hf_tokenizer_name": "local tokenizer.json (word level)",
        },
    }


def build_model(model_cfg: dict, init_temperature: float = 0.07) -> open_clip.CLIP:
    """A randomly initialised open_clip CLIP (torch's global seed decides the weights) that knows
    its preprocessing, as one loaded from a folder does."""
    model = open_clip.CLIP(**model_cfg)
    model.logit_scale.data.fill_(math.log(1 / init_temperature))
    open_clip.set_model_preprocess_cfg(model, PREPROCESS)
    return model


def contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    ids: torch.Tensor,
    scale: torch.Tensor,
    neg: torch.Tensor | None = None,
    neg_ok: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch; identical texts in a batch all count as right answers.

    ``neg`` ``[B, D]``: each image's own hard-negative text, one more wrong choice in its
    image->text row where ``neg_ok`` ``[B]`` is true."""
    logits = scale * img @ txt.T  # [B, B]
    same = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1).float()  # [B, B]: text i == text j
    target = same / same.sum(1, keepdim=True)
    i2t, i2t_target = logits, target
    if neg is not None:
        # [B, 1]; masked with a finite value (0 * -inf is nan in the cross-entropy)
        extra = (scale * (img * neg).sum(-1, keepdim=True)).masked_fill(~neg_ok.unsqueeze(1), -1e4)
        i2t = torch.cat([logits, extra], 1)  # [B, B + 1]
        i2t_target = torch.cat([target, torch.zeros_like(extra)], 1)
    return 0.5 * (F.cross_entropy(i2t, i2t_target) + F.cross_entropy(logits.T, target))


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices, not on embeddings, norms, biases or the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- data and files
def load_split(world_dir: Path, split: str) -> tuple[torch.Tensor, list[list[str]], list[list[Obj]]]:
    """A world split as ``([N, 3, H, W]`` uint8 images, captions per image, objects per image)."""
    contexts = coco.load_contexts(
        world_dir / "annotations" / f"instances_{split}.json", world_dir / "annotations" / f"captions_{split}.json"
    )
    images = torch.stack(
        [
            to_uint8(load_image(world_dir / split / c.file_name).convert("RGB"))
            for c in tqdm(contexts, desc=f"load {split}", unit="img")
        ]
    )
    return images, [c.captions for c in contexts], [c.objects for c in contexts]


def pretrain_scenes(world_cfg: WorldConfig, objs: list[list[Obj]]) -> list[Scene]:
    """The pretrain split's scenes (tints and background included), drawn again from the world's
    seed and checked against the objects read from disk, so counterfactual twins can be drawn."""
    scenes = sample_world(world_cfg)["pretrain"]
    tol = 0.5 / world_cfg.image_size
    for i, (scene, want) in enumerate(zip(scenes, objs)):
        got = scene.objects()
        if len(got) != len(want) or any(
            a.name != b.name or max(abs(x - y) for x, y in zip(a.box, b.box)) > tol for a, b in zip(got, want)
        ):
            raise ValueError(
                f"pretrain scene #{i} (image {scene.image_id}) on disk is not the one the world config "
                f"draws (expected {[o.name for o in got]}, found {[o.name for o in want]}): regenerate "
                "the world with this preset, or pass --world for the folder made with it"
            )
    if len(scenes) != len(objs):
        raise ValueError(f"the world config draws {len(scenes)} pretrain scenes, the folder has {len(objs)}")
    return scenes


def load_init(model, mcfg: dict, tokenizer, folder: Path) -> None:
    """Start from a saved tiny CLIP: same architecture, same vocabulary (else a clear error)."""
    saved = io.read_json(folder / "open_clip_config.json")["model_cfg"]
    if saved != mcfg:
        diff = {k: (saved.get(k), mcfg.get(k)) for k in set(saved) | set(mcfg) if saved.get(k) != mcfg.get(k)}
        raise ValueError(f"{folder}/open_clip_config.json: another architecture (saved, wanted): {diff}")
    vocab = io.read_json(folder / "tokenizer.json")["model"]["vocab"]
    if vocab != tokenizer.get_vocab():
        raise ValueError(
            f"{folder}/tokenizer.json: its vocabulary differs from this run's texts' "
            f"({len(vocab)} vs {len(tokenizer.get_vocab())} words); "
            "start from a model trained on this world"
        )
    model.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")))
    log.info("starting from %s", folder)


def save(model, mcfg: dict, tokenizer, out: Path) -> None:
    """Weights (safetensors), open_clip config and tokenizer files, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with io.atomic_path(out / "open_clip_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    io.write_json(out / "open_clip_config.json", {"model_cfg": mcfg, "preprocess_cfg": PREPROCESS}, indent=2)
    tmp_dir = out / ".tokenizer.tmp"
    tokenizer.save_pretrained(tmp_dir)
    for f in tmp_dir.iterdir():
        f.replace(out / f.name)
    tmp_dir.rmdir()


# ---------------------------------------------------------------- training
def _with_twins(
    batch_u8: torch.Tensor, tb: TextBatch, idx: torch.Tensor, scenes: list, bank: TextBank, seed: str
) -> tuple[torch.Tensor, TextBatch]:
    """The batch with each valid counterfactual scene drawn and added as a pair of its own (its
    image with its text): each true text is then a hard negative for its twin image, and each
    twin text for the true image. ``[B, 3, H, W]`` -> ``[B + twins, 3, H, W]``."""
    sel = tb.neg_ok.nonzero().squeeze(1).tolist()
    twins = [
        with_objects(
            scenes[idx[j]], bank.changed_objects(idx[j], bool(tb.is_desc[j]), tb.k[j]), random.Random(f"{seed}:{j}")
        )
        for j in sel
    ]
    batch_u8 = torch.cat([batch_u8, torch.stack([to_uint8(render(t).convert("RGB")) for t in twins])])
    ids = torch.cat([tb.ids, tb.neg_ids[sel]])
    return batch_u8, tb._replace(ids=ids, neg_ok=torch.zeros_like(tb.neg_ok))  # the twins' texts are in the batch


def _train_step(
    model, opt, batch_u8: torch.Tensor, tb: TextBatch, lr: float, hard_negatives: bool, bf16: bool
) -> float:
    """One optimiser step of the contrastive loss (with each valid hard negative); returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    dev = next(model.parameters()).device
    batch_u8, ids, neg_ids, neg_ok = (t.to(dev) for t in (batch_u8, tb.ids, tb.neg_ids, tb.neg_ok))
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        img = model.encode_image(normalise(batch_u8, MEAN, STD), normalize=True)  # [B, D]
        txt = encode_text(model, ids)  # [B, D]
        neg = encode_text(model, neg_ids[neg_ok]) if hard_negatives and neg_ok.any() else None  # [b', D]
    if neg is not None:
        neg = torch.zeros_like(txt, dtype=neg.dtype).index_put((neg_ok.nonzero().squeeze(1),), neg)  # [B, D]
    loss = contrastive_loss(
        img.float(), txt.float(), ids, model.logit_scale.exp(), None if neg is None else neg.float(), neg_ok
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def train(
    arch: ClipArchitecture,
    texts: ClipTexts,
    training: ClipTraining,
    runtime: ClipRuntime,
    world_cfg: WorldConfig,
    world_dir: Path,
    out: Path,
    command: str = "",
    data=None,
) -> dict:
    """Train on ``world_dir``'s pretrain split (drawn by ``world_cfg``) and write the shipped folder
    ``out``. ``data``: the split as :func:`load_split` returns it, if already in memory."""
    dev = training_device(runtime.device)  # before any loading: a missing GPU fails at once
    torch.set_flush_denormal(True)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    torch.manual_seed(training.seed)
    t_start = time.time()
    images, caps, objs = data or load_split(world_dir, "pretrain")  # [N, 3, H, W] uint8
    n, bank = len(images), TextBank(caps, objs, random.Random(training.seed), arch.context_length)
    scenes = pretrain_scenes(world_cfg, objs) if texts.counterfactual_images else None
    ev_images, ev_caps, _ = heldout_scenes(world_cfg, runtime.eval_scenes, "clip-eval")
    mcfg = model_config(arch, bank.tokenizer)
    model = build_model(mcfg, arch.init_temperature)
    if training.init:
        load_init(model, mcfg, bank.tokenizer, Path(training.init))
    model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny CLIP: %.2fM parameters, %d pretrain images, vocabulary %d", n_params / 1e6, n, len(bank.tokenizer))
    opt = torch.optim.AdamW(_param_groups(model, training.weight_decay), lr=training.lr, betas=(0.9, 0.98), eps=1e-6)

    rows, gen = [], torch.Generator().manual_seed(training.seed)
    order, pos = torch.randperm(n, generator=gen), 0
    t_train = time.time()
    for step in (bar := tqdm(range(training.steps), desc="tiny CLIP", unit="step")):
        if pos + training.batch_size > n:  # a new epoch
            order, pos = torch.randperm(n, generator=gen), 0
        idx, pos = order[pos : pos + training.batch_size], pos + training.batch_size  # [B]
        tb, batch_u8 = bank.draw(idx, gen, texts), images[idx]
        if scenes is not None and tb.neg_ok.any():
            batch_u8, tb = _with_twins(batch_u8, tb, idx, scenes, bank, f"{training.seed}:{step}")
        lr = training.lr * lr_factor(step, training.steps, training.warmup_steps)
        loss = _train_step(model, opt, batch_u8, tb, lr, texts.hard_negatives, training.bf16)
        row = {
            "step": step + 1,
            "loss": round(loss, 4),
            "lr": opt.param_groups[0]["lr"],
            "temperature": round(1 / model.logit_scale.exp().item(), 4),
            "elapsed_s": round(time.time() - t_train, 1),
        }
        if (step + 1) % runtime.eval_every == 0 or step + 1 == training.steps:
            r = clip_retrieval(model, lambda t: tokenize(bank.tokenizer, t, arch.context_length), ev_images, ev_caps)
            row.update({"eval_r@1": round(r["r@1"], 4), "eval_r@5": round(r["r@5"], 4)})
            log.info("step %d loss %.3f held-out r@1 %.3f r@5 %.3f", step + 1, row["loss"], r["r@1"], r["r@5"])
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    train_s = time.time() - t_train

    save(model.cpu().eval(), mcfg, bank.tokenizer, out)
    metrics = measure_clip(out, world_cfg, runtime.metric_scenes)
    metrics.update(
        {
            "parameters": n_params,
            "train_seconds": round(train_s, 1),
            "ms_per_step": round(1000 * train_s / training.steps, 1),
            "total_seconds": round(time.time() - t_start, 1),
            "config": {**flat(arch, texts, training, runtime), "world": asdict(world_cfg)},
            "threads": torch.get_num_threads(),
        }
    )
    io.write_json(out / "metrics.json", metrics, indent=2)
    jsonl.write_jsonl(out / "train_log.jsonl", rows)
    plot_log(rows, out / "loss.png")
    io.write_text(out / "README.md", clip_card(arch, texts, training, metrics, command))
    return metrics


def train_and_report(
    out: str | Path,
    arch: ClipArchitecture,
    texts: ClipTexts,
    training: ClipTraining,
    runtime: ClipRuntime,
    preset: str = "tiny",
    world: str | Path | None = None,
    command: str = "",
) -> dict:
    """The recipe behind ``llava-lite backbones clip``: the preset's world (generated in ``world``,
    default ``outputs/<preset>/world``, when missing), then :func:`train` into ``out``, whose card
    records ``command``."""
    world_cfg = get_preset(preset).world
    world_dir = Path(world) if world else Layout.for_preset(preset).world
    if not (world_dir / "annotations" / "instances_pretrain.json").exists():
        log.info("no pretrain split in %s: generating the world", world_dir)
        generate(world_cfg, world_dir)
    return train(arch, texts, training, runtime, world_cfg, world_dir, Path(out), command)
