"""The tiny LM that LLaVA's ``tiny`` preset starts from: a small Llama pretrained to *read*.

Given a scene as text and a question, it must answer, as the paper's LLM does before images are
added. :func:`pretrain_lm` trains it on reading documents (:mod:`llava_lite.lab.documents`) with
one AdamW loop, resumable from ``checkpoint.pt`` at the very step it stopped;
:func:`text_only_accuracy` scores it on held-out scenes (the analogue of the paper's text-only
GPT-4 row) and :func:`heldout_perplexity` measures its answers' loss. :func:`train_and_report` is
the whole recipe behind ``llava-lite backbones lm`` and the card in ``data/pretrained/tiny-lm/``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .. import io, jsonl
from ..coco import SymbolicContext, load_contexts
from ..config import get_preset
from ..conversation import END, IGNORE, get_template
from ..envcheck import training_device
from ..evaluate import Item, ask_reader, records, score
from ..generate import evaluating
from ..model import token_loss
from ..paths import Layout
from ..scene_text import reading_context, reading_layout
from ..teachers.questions import ExactQA
from ..train import lr_factor
from ..world import generate as generate_world
from .cards import plot_training
from .config import LMArchitecture, LMDocuments, LMRuntime, LMTraining, flat
from .documents import DocStream, collate, reading_documents, scene_questions, stream_batches
from .tokenizers import tokenizer_corpus, train_tokenizer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the model
def build_model(arch: LMArchitecture, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of ``arch`` over ``tokenizer``'s vocabulary (tied embeddings)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.lm_hidden,
        intermediate_size=arch.lm_intermediate,
        num_hidden_layers=arch.lm_layers,
        num_attention_heads=arch.lm_heads,
        num_key_value_heads=arch.lm_heads,
        max_position_embeddings=arch.lm_max_positions,
        rope_theta=arch.lm_rope_theta,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tiny_lm(path: str | Path):
    """``(model, tokenizer)`` from a directory written by :func:`pretrain_lm` (or any
    ``save_pretrained`` causal LM with a chat tokenizer), in eval mode."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json; expected a save_pretrained model directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), tokenizer


# ------------------------------------------------------------------ measures
def eval_questions(
    contexts: Sequence[SymbolicContext], per_scene: int = 6, seed: int = 1234
) -> list[tuple[SymbolicContext, ExactQA]]:
    """A fixed list of ``(context, ExactQA)``: ``per_scene`` questions per scene, seeded by its id."""
    out = []
    for ctx in contexts:
        rng = random.Random(f"{seed}:{ctx.image_id}")
        out += [(ctx, qa) for qa in scene_questions(ctx, rng, per_scene)]
    return out


def text_only_accuracy(
    model,
    tokenizer,
    contexts: Sequence[SymbolicContext],
    per_scene: int = 6,
    batch_size: int = 64,
    max_new_tokens: int = 4,
    seed: int = 1234,
    progress: bool = False,
) -> dict:
    """Exact-answer accuracy from the scene as text alone (in the layout the tokenizer records),
    greedy. Returns :func:`llava_lite.evaluate.score`'s overall, per-type accuracy, counts and
    most-common-answer baseline, plus the number of ``scenes`` and five ``examples``."""
    asked = eval_questions(contexts, per_scene, seed)
    items = [
        Item(f"{c.image_id}/{k}", c.file_name, qa.qtype, qa.question, qa.answer) for k, (c, qa) in enumerate(asked)
    ]
    by_file = {c.file_name: c for c in contexts}
    replies = ask_reader(
        model, get_template("roles", tokenizer), tokenizer, items, by_file, batch_size, max_new_tokens, progress
    )
    result = score(records(items, replies))
    layout = reading_layout(tokenizer)
    examples = [
        {"context": reading_context(c, layout), "question": qa.question, "answer": qa.answer, "reply": r}
        for (c, qa), r in list(zip(asked, replies))[:5]
    ]
    return {**result, "scenes": len(contexts), "examples": examples}


@torch.no_grad()
def heldout_perplexity(
    model,
    tokenizer,
    contexts: Sequence[SymbolicContext],
    qa_per_doc: int = 8,
    caption_share: float = 0.05,
    batch_size: int = 32,
    seed: int = 1234,
) -> float:
    """``exp`` of the mean loss per supervised token (answers, captions and their ``<|end|>``) on
    reading documents of held-out scenes, in the layout the tokenizer records."""
    template = get_template("roles", tokenizer)
    docs = reading_documents(contexts, random.Random(seed), qa_per_doc, caption_share, reading_layout(tokenizer))
    encoded = sorted((template.encode(d) for d in docs), key=len)
    total, count = 0.0, 0
    with evaluating(model):
        for s in range(0, len(encoded), batch_size):
            ids, labels = collate(
                [(e.input_ids, e.labels) for e in encoded[s : s + batch_size]], tokenizer.pad_token_id
            )  # [B, T]
            ids, labels = ids.to(model.device), labels.to(model.device)
            total += token_loss(model(input_ids=ids).logits, labels, reduction="sum").item()
            count += int((labels[:, 1:] != IGNORE).sum())
    return math.exp(total / max(1, count))


# ------------------------------------------------------------------ pretraining
def lr_at(step: int, t: LMTraining) -> float:
    """The learning rate of ``step``: warmup, then a cosine to ``min_lr`` (``wsd``: held until the
    last ``decay_share`` of the steps, then the cosine)."""
    decay_from = int(t.steps * (1 - t.decay_share)) if t.lr_schedule == "wsd" else None
    return t.lr * lr_factor(step, t.steps, t.warmup, floor=t.min_lr / t.lr if t.lr else 0.0, decay_from=decay_from)


def _tokenizer(out: Path, pretrain: Sequence[SymbolicContext], arch: LMArchitecture, docs: LMDocuments, seed: int):
    """The run's tokenizer: trained once on the first 5000 scenes and saved in ``out`` (a resumed
    run reloads it), with the layout it reads recorded."""
    if (out / "tokenizer.json").exists() and (out / "checkpoint.pt").exists():
        return AutoTokenizer.from_pretrained(out)
    tokenizer = train_tokenizer(tokenizer_corpus(pretrain[:5000], seed), arch.vocab_size)
    tokenizer.init_kwargs["reading_layout"] = docs.layout
    tokenizer.save_pretrained(out)
    return tokenizer


def _optimizer(model, t: LMTraining) -> torch.optim.AdamW:
    """AdamW, weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.95),
    )


def _resume(ckpt: Path, model, opt, learned: dict, dev) -> tuple[int, float]:
    """``(step, seconds)`` of ``ckpt`` with its weights and optimiser state loaded, or ``(0, 0.0)``
    without one. A checkpoint written with other learned settings is refused, naming them."""
    if not ckpt.exists():
        return 0, 0.0
    state = torch.load(ckpt, weights_only=False, map_location=dev)
    saved = state.get("learned")
    if saved is None:
        raise ValueError(f"{ckpt}: no 'learned' settings in it (written by another version of this code); delete it")
    differ = sorted(k for k in set(saved) | set(learned) if saved.get(k) != learned.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} there, {learned.get(k)!r} now" for k in differ)
        raise ValueError(f"{ckpt}: written with other settings ({changes}); delete it or resume with the same settings")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    log.info("resuming from %s at step %d", ckpt, state["step"])
    return state["step"], state["elapsed"]


def _save_checkpoint(ckpt: Path, model, opt, step: int, elapsed: float, learned: dict) -> None:
    with io.atomic_path(ckpt) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "learned": learned,
            },
            tmp,
        )


def _keep_log(path: Path, step: int) -> None:
    """Keep the lines of ``log.jsonl`` that a checkpoint at ``step`` covers (none on a fresh start)."""
    if path.exists():
        kept = [rec for _, rec in jsonl.read_jsonl(path) if rec["step"] <= step]
        jsonl.write_jsonl(path, kept)


def _eval_row(step: int, seconds: float, m: dict) -> dict:
    return {
        "step": step,
        "seconds": round(seconds, 2),
        "eval_overall": round(m["overall"], 4),
        **{f"eval_{k}": round(v, 4) for k, v in m["accuracy"].items()},
    }


def _train_step(model, opt, ids: torch.Tensor, weights: torch.Tensor, lr: float, t: LMTraining) -> float:
    """One optimiser step on the weighted next-token loss of ``ids`` ``[B, T]``; returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=t.bf16):
        loss = token_loss(model(input_ids=ids).logits, ids, weights=weights)  # [B, T, V] -> scalar
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    return loss.item()


def pretrain_lm(
    pretrain: Sequence[SymbolicContext],
    val: Sequence[SymbolicContext],
    out: str | Path,
    arch: LMArchitecture,
    docs: LMDocuments,
    training: LMTraining,
    runtime: LMRuntime,
    tokenizer=None,
    progress: bool = True,
    on_eval: Callable[[int, dict], None] | None = None,
):
    """Pretrain the tiny LM on reading documents of ``pretrain`` scenes; score it on ``val``.

    Writes to ``out``: ``log.jsonl`` (one line per step: loss, lr, tokens, seconds; eval lines with
    per-type accuracy), ``checkpoint.pt`` every ``checkpoint_every`` steps (a stopped run resumes
    from it), and at the end the model and tokenizer (``save_pretrained``) plus ``metrics.json``.
    ``on_eval(step, accuracy)`` is called after each eval. Returns ``(model, tokenizer, metrics)``.
    """
    dev = training_device(runtime.device)  # before any work: a missing GPU fails at once
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(runtime.threads)
    torch.set_flush_denormal(True)
    tokenizer = tokenizer or _tokenizer(out, pretrain, arch, docs, training.seed)
    model = build_model(arch, tokenizer, training.seed).to(dev)
    opt = _optimizer(model, training)
    learned, ckpt, log_path = flat(arch, docs, training), out / "checkpoint.pt", out / "log.jsonl"
    start, elapsed = _resume(ckpt, model, opt, learned, dev)
    stream = DocStream(
        pretrain, get_template("roles", tokenizer), docs, training.batch_size, training.seed, tokenizer.pad_token_id
    )
    _keep_log(log_path, start)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny LM: %.2fM parameters, %d steps of %d documents", n_params / 1e6, training.steps, training.batch_size)
    model.train()
    bar = tqdm(
        range(start, training.steps), desc="pretrain LM", disable=not progress, initial=start, total=training.steps
    )
    t0 = time.perf_counter() - elapsed
    with jsonl.open_for_append(log_path) as logf:
        for step, (ids, weights) in zip(bar, stream_batches(stream, start, training.steps, runtime.workers)):
            ids, weights = ids.to(dev, non_blocking=True), weights.to(dev, non_blocking=True)  # [B, T]
            loss = _train_step(model, opt, ids, weights, lr_at(step, training), training)
            jsonl.append(
                logf,
                {
                    "step": step + 1,
                    "loss": round(loss, 5),
                    "lr": round(opt.param_groups[0]["lr"], 7),
                    "tokens": ids.numel(),
                    "seconds": round(time.perf_counter() - t0, 2),
                },
            )
            bar.set_postfix(loss=f"{loss:.3f}")
            done = step + 1
            if runtime.eval_every and (done % runtime.eval_every == 0 or done == training.steps) and val:
                m = text_only_accuracy(model, tokenizer, val[: runtime.eval_scenes])
                row = _eval_row(done, time.perf_counter() - t0, m)
                jsonl.append(logf, row)
                log.info("step %d: %s", done, row)
                if on_eval:
                    on_eval(done, m)
            # after the step's eval line: a checkpoint covers every line up to its step, so a run
            # killed between the two never loses the eval of a step it does not redo
            if runtime.checkpoint_every and done % runtime.checkpoint_every == 0 and done < training.steps:
                _save_checkpoint(ckpt, model, opt, done, time.perf_counter() - t0, learned)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {
        "parameters": n_params,
        "steps": training.steps,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "config": flat(arch, docs, training, runtime),
    }
    io.write_json(out / "metrics.json", metrics, indent=2)
    ckpt.unlink(missing_ok=True)
    return model, tokenizer, metrics


# ------------------------------------------------------------------ the recipe
def world_contexts(world_dir: Path, split: str) -> list[SymbolicContext]:
    """The scenes of one split of a world folder."""
    ann = world_dir / "annotations"
    inst, caps = ann / f"instances_{split}.json", ann / f"captions_{split}.json"
    if not inst.exists():
        raise FileNotFoundError(f"{inst}: no {split} split; run `llava-lite world` first or drop --world")
    return load_contexts(inst, caps)


def train_and_report(
    out: str | Path,
    arch: LMArchitecture,
    docs: LMDocuments,
    training: LMTraining,
    runtime: LMRuntime,
    world: str | Path | None = None,
    preset: str = "tiny",
    eval_split: str = "test",
    progress: bool = True,
) -> dict:
    """The whole recipe behind the shipped LM: the world's ``pretrain`` split (the preset's world,
    generated if missing), tokenizer, pretraining, then text-only accuracy and perplexity on
    ``eval_split``, written to ``out/metrics.json`` with a training plot."""
    out = Path(out)
    world_dir = Path(world) if world else Layout.for_preset(preset).world
    if not (world_dir / "annotations" / "instances_pretrain.json").exists():
        log.info("no world in %s: generating the %s preset's world", world_dir, preset)
        generate_world(get_preset(preset).world, world_dir, progress=progress)
    pretrain, val = world_contexts(world_dir, "pretrain"), world_contexts(world_dir, "val")
    heldout = world_contexts(world_dir, eval_split)
    model, tokenizer, metrics = pretrain_lm(pretrain, val, out, arch, docs, training, runtime, progress=progress)
    acc = text_only_accuracy(model, tokenizer, heldout, progress=progress)
    metrics.update(
        {"eval_split": eval_split, "text_only": acc, "perplexity": heldout_perplexity(model, tokenizer, heldout)}
    )
    io.write_json(out / "metrics.json", metrics, indent=2)
    plot_training(out / "log.jsonl", out / "training.png")
    log.info(
        "text-only accuracy on %d %s scenes: %.3f overall; %s; perplexity %.3f",
        len(heldout),
        eval_split,
        acc["overall"],
        ", ".join(f"{k} {v:.3f}" for k, v in acc["accuracy"].items()),
        metrics["perplexity"],
    )
    return metrics
