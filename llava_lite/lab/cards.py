"""What a backbone run leaves beside its weights for a reader: training plots and the tiny CLIP's card.

The tiny LM's card (``data/pretrained/tiny-lm/README.md``) is kept by hand and shows
``training.png`` (:func:`plot_training`). The tiny CLIP's ``README.md`` is written by its run from
``tiny_clip_card.md`` (:func:`clip_card`: the command, the settings, the measured numbers) beside
``loss.png`` (:func:`plot_log`); what led to a recipe goes in each folder's ``LAB.md``.
"""

from __future__ import annotations

from pathlib import Path

from .. import io, jsonl
from ..teachers.questions import QTYPES
from .config import ClipArchitecture, ClipTexts, ClipTraining

CLIP_CARD = Path(__file__).with_name("tiny_clip_card.md")


def _savefig(fig, path: str | Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_training(log_path: str | Path, png: str | Path, smooth: int = 25) -> None:
    """The tiny LM's ``log.jsonl`` drawn: training loss (raw and smoothed) and held-out accuracy
    per question type against steps."""
    import matplotlib  # the file backend is chosen here, only when a card is drawn (a notebook keeps its own)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # once the backend is chosen

    rows = [rec for _, rec in jsonl.read_jsonl(log_path)]
    train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_overall" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
    windows = [loss[max(0, i - smooth + 1) : i + 1] for i in range(len(loss))]
    a.plot(steps, loss, alpha=0.25, color="C0")
    a.plot(steps, [sum(w) / len(w) for w in windows], color="C0")
    a.set(xlabel="step", ylabel="training loss (answers + weighted text)", yscale="log", title="pretraining loss")
    for t in ("overall",) + QTYPES:
        pts = [(r["step"], r[f"eval_{t}"]) for r in evals if f"eval_{t}" in r]
        if pts:
            b.plot(*zip(*pts), marker=".", label=t, lw=2.5 if t == "overall" else 1.2)
    b.set(xlabel="step", ylabel="text-only accuracy", ylim=(0, 1.02), title="held-out accuracy (val scenes)")
    b.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, png)
    plt.close(fig)


def plot_log(rows: list[dict], path: str | Path) -> None:
    """The tiny CLIP's training rows drawn: contrastive loss, and held-out recall@1/@5 at each eval."""
    import matplotlib  # the file backend is chosen here, only when a card is drawn (a notebook keeps its own)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # once the backend is chosen

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
    ax[0].set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ev = [r for r in rows if "eval_r@1" in r]
    ax[1].plot([r["step"] for r in ev], [r["eval_r@1"] for r in ev], "o-", label="recall@1")
    ax[1].plot([r["step"] for r in ev], [r["eval_r@5"] for r in ev], "s-", label="recall@5")
    ax[1].set(xlabel="step", ylim=(0, 1), title="held-out retrieval (1 in 100)")
    ax[1].legend()
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


RETRIEVAL_ROWS = {
    "retrieval_descriptions": "a description naming every object",
    "retrieval_scenes": "any of a scene's 5 world captions, all 500 of the group ranked",
    "retrieval": "one world caption per scene",
}


def _metric_rows(m: dict) -> tuple[str, str]:
    """The card's retrieval rows and per-patch probe rows (markdown table lines)."""
    rows = "".join(
        f"| image->text recall@1 / @5, 1 of 100 scenes: {label} | {m[k]['r@1']:.3f} / {m[k]['r@5']:.3f} |\n"
        for k, label in RETRIEVAL_ROWS.items()
        if k in m
    )
    if "caption_truth_oracle" in m:
        o = m["caption_truth_oracle"]
        rows += (
            f"| the last row for a reader that knows which captions are true (at most; "
            f"{o['no_true_rival']:.0%} of its queries have no true rival) | {o['r@1']:.3f} |\n"
        )
    patches = "".join(
        f"| {a} of the object under one patch, layer -2 | {v['accuracy']:.3f} (majority {v['majority']:.3f}) |\n"
        for a, v in m.get("patch_probe_layer-2", {}).items()
    )
    return rows, patches


def clip_card(arch: ClipArchitecture, texts: ClipTexts, training: ClipTraining, m: dict, command: str) -> str:
    """The tiny CLIP's ``README.md``: what it is, how to load it, the command and settings that
    made it, and ``m`` (its ``metrics.json``) as tables."""
    p2, p1 = m["probe_layer-2"], m["probe_layer-1"]
    retrieval_rows, patch_rows = _metric_rows(m)
    negatives = "; each description also scored against its counterfactual (one shape, colour or place changed)"
    twins = (
        "; the counterfactual scene was also drawn and put in the batch with its description, so each true "
        "text is a hard negative for its twin image"
    )
    init = (
        f" Training started from the tiny CLIP then in `{training.init}` (`LAB.md` has how that one was made), "
        "not from random weights."
    )
    return CLIP_CARD.read_text(encoding="utf-8").format(
        params_m=m["parameters"] / 1e6,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        vision_width=arch.vision_width,
        vision_layers=arch.vision_layers,
        text_width=arch.text_width,
        text_layers=arch.text_layers,
        command=command,
        seed=training.seed,
        steps=training.steps,
        batch_size=training.batch_size,
        lr=training.lr,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_steps,
        bf16=training.bf16,
        describe_pct=int(texts.describe_prob * 100),
        shape_pct=int(texts.shape_prob * 100),
        negatives=(negatives if texts.hard_negatives else "") + (twins if texts.counterfactual_images else ""),
        init=init if training.init else "",
        train_min=m["train_seconds"] / 60,
        ms_per_step=m["ms_per_step"],
        threads=m["threads"],
        total_min=m["total_seconds"] / 60,
        heldout_scenes=m["heldout_scenes"],
        retrieval_rows=retrieval_rows,
        p2_shape=p2["shape"]["accuracy"],
        p2_shape_majority=p2["shape"]["majority"],
        p2_colour=p2["colour"]["accuracy"],
        p2_colour_majority=p2["colour"]["majority"],
        p1_shape=p1["shape"]["accuracy"],
        p1_colour=p1["colour"]["accuracy"],
        patch_rows=patch_rows,
    )
