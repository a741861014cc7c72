"""Pictures for the notebooks: scenes with their boxes and captions, curves, tables."""

from __future__ import annotations

import collections
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.patches as mpatches
import matplotlib.pyplot as plt
from PIL import Image

from .coco import SymbolicContext

BOX_COLOUR = "black"


def show_scenes(
    contexts: Sequence[SymbolicContext], image_dir: str | Path, ncols: int = 4, captions: int = 1, scale: float = 3.0
):
    """A grid of scenes with every box and category drawn on, and their first captions below."""

    n = len(contexts)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * scale, nrows * (scale + 0.45 * captions + 0.3)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, ctx in zip(axes.flat, contexts):
        img = Image.open(Path(image_dir) / ctx.file_name).convert("RGB")
        ax.imshow(img, extent=(0, 1, 1, 0))
        for o in ctx.objects:
            x1, y1, x2, y2 = o.box
            ax.add_patch(mpatches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1, ec=BOX_COLOUR, ls="--"))
            ax.text(x1, y1 - 0.01, o.name, fontsize=6, va="bottom", color=BOX_COLOUR)
        text = "\n".join(textwrap.fill(c, 34) for c in ctx.captions[:captions])
        ax.set_title(f"image {ctx.image_id}", fontsize=8)
        ax.text(0, -0.02, text, fontsize=7, va="top", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str = "step",
    ylabel: str = "loss",
    title: str = "",
    logy: bool = False,
):
    """Several ``name -> (x, y)`` curves on one axis."""

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    return fig


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = "{:.3f}") -> str:
    """A markdown table (renders in notebooks through ``IPython.display.Markdown``)."""
    columns = list(columns or rows[0].keys())
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def sample_markdown(sample: dict) -> str:
    """One LLaVA sample as a readable dialogue (``<image>`` shown as a picture marker)."""
    lines = [f"**{sample.get('type', 'sample')}** · `{sample['id']}`", ""]
    for turn in sample["conversations"]:
        who = "🧑 human" if turn["from"] == "human" else "🤖 assistant"
        text = turn["value"].replace("<image>", "🖼️`<image>`").replace("\n", " ")
        lines.append(f"- **{who}:** {text}")
    return "\n".join(lines)


def instruction_stats(samples: Sequence[dict]):
    """Four panels: samples per type, turns per conversation, answer lengths, question words."""

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.2))
    types = collections.Counter(s.get("type", "?") for s in samples)
    ax[0].bar(list(types), list(types.values()))
    ax[0].set(title="samples per type")
    ax[0].tick_params(axis="x", rotation=45)
    turns = [len(s["conversations"]) // 2 for s in samples if s.get("type") == "conversation"]
    ax[1].hist(turns, bins=range(1, max(turns or [1]) + 2), align="left", rwidth=0.8)
    ax[1].set(title="turns per conversation", xlabel="question/answer pairs")
    for kind in types:
        lengths = [
            len(t["value"].split())
            for s in samples
            if s.get("type") == kind
            for t in s["conversations"]
            if t["from"] == "gpt"
        ]
        ax[2].hist(lengths, bins=30, alpha=0.5, label=kind)
    ax[2].set(title="answer length", xlabel="words", yscale="log")
    ax[2].legend(fontsize=7)
    first = collections.Counter(
        t["value"].replace("<image>", "").split()[0].lower()
        for s in samples
        for t in s["conversations"]
        if t["from"] == "human" and t["value"].replace("<image>", "").split()
    )
    top = first.most_common(12)
    ax[3].barh([w for w, _ in top][::-1], [n for _, n in top][::-1])
    ax[3].set(title="first word of questions")
    fig.tight_layout()
    return fig


def show_patch_words(image_path: str | Path, words: Sequence[str], size: float = 6.0):
    """The image under a grid of one word per patch token (row-major, as the tower emits them)."""

    grid = int(math.isqrt(len(words)))
    if grid * grid != len(words):
        raise ValueError(f"{len(words)} words do not make a square grid of patches")
    img = Image.open(image_path).convert("RGB")
    fig, (a, b) = plt.subplots(1, 2, figsize=(2 * size, size))
    a.imshow(img)
    a.set_title("the image")
    b.imshow(img, extent=(0, grid, grid, 0), alpha=0.35)
    for k, w in enumerate(words):
        r, c = divmod(k, grid)
        b.text(c + 0.5, r + 0.5, w, ha="center", va="center", fontsize=max(4, 60 / grid))
    b.set_xticks(range(grid + 1))
    b.set_yticks(range(grid + 1))
    b.grid(True, lw=0.3)
    b.set_title("nearest word of each projected patch")
    for ax in (a, b):
        ax.tick_params(labelbottom=False, labelleft=False)
    fig.tight_layout()
    return fig


def show_answers(recs: Sequence[dict], image_dir: str | Path, ncols: int = 4, scale: float = 3.0):
    """Scenes with a question, the model's reply and the truth (green when right, red when wrong)."""

    nrows = max(1, -(-len(recs) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * (scale + 0.9)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, recs):
        ax.imshow(Image.open(Path(image_dir) / r["image"]).convert("RGB"))
        ax.set_title(textwrap.fill(r["question"], 34), fontsize=7)
        colour = "#1a7f37" if r["correct"] else "#cf222e"
        ax.text(
            0,
            -0.04,
            f"model: {r['reply'] or '∅'}\ntruth: {r['answer']}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color=colour,
        )
    fig.tight_layout()
    return fig


def show_images(images: Sequence, titles: Sequence[str] = (), scale: float = 2.2):
    """Images in a row: uint8 tensors ``[3, H, W]`` (as the world renders them in memory), arrays or PIL images."""

    fig, axes = plt.subplots(1, len(images), figsize=(len(images) * scale, scale + 0.3), squeeze=False)
    for i, (ax, img) in enumerate(zip(axes[0], images)):
        if hasattr(img, "permute") and img.ndim == 3 and img.shape[0] in (1, 3):
            img = img.permute(1, 2, 0).numpy()
        ax.imshow(img)
        ax.axis("off")
        if i < len(titles):
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def show_patch_pca(images: Sequence, maps: Sequence, titles: Sequence[str] = (), scale: float = 2.6, width: int = 30):
    """Each image above the PCA colour map of its patch features (see :func:`llava_lite.probes.pca_rgb`),
    both with the tower's patch grid drawn on them, so a cell of the map sits under its patch. Titles
    are wrapped at ``width`` characters, never cut."""
    n = len(images)
    titles = [textwrap.fill(t, width) for t in titles]
    lines = max((t.count("\n") + 1 for t in titles), default=0)
    fig, axes = plt.subplots(2, n, figsize=(n * scale, 2 * scale + 0.15 * lines), squeeze=False)
    for i, (img, m) in enumerate(zip(images, maps)):
        grid = len(m)
        h, w = plt.imread(img).shape[:2] if isinstance(img, (str, Path)) else (img.height, img.width)
        axes[0, i].imshow(img)
        axes[1, i].imshow(m, interpolation="nearest")
        for k in range(1, grid):
            for ax, (x, y) in ((axes[0, i], (k * w / grid, k * h / grid)), (axes[1, i], (k - 0.5, k - 0.5))):
                ax.axvline(x, color="white", lw=0.4, alpha=0.7)
                ax.axhline(y, color="white", lw=0.4, alpha=0.7)
        if i < len(titles):
            axes[0, i].set_title(titles[i], fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel(f"image, {len(maps[0])}x{len(maps[0])} patches", fontsize=8)
    axes[1, 0].set_ylabel("patch features:\n3 principal components as RGB", fontsize=8)
    fig.tight_layout()
    return fig


def plot_seed_bars(
    panels: dict[str, dict[str, Sequence[float]]],
    reference: dict[str, float] | None = None,
    chance: dict[str, float] | None = None,
):
    """One panel per ``title -> {bar: values over seeds}``: each bar at the mean, its error bar from
    the lowest seed to the highest, every seed as a dot. ``reference`` (``bar -> number``), when
    given, is drawn as its own panel (e.g. the paper's numbers, which have no seeds); ``chance``
    (``title -> number``) draws what guessing scores across that panel as a dashed line."""
    n = len(panels) + (reference is not None)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels.items()):
        names = list(bars)
        means = [sum(v) / len(v) for v in bars.values()]
        low = [m - min(v) for m, v in zip(means, bars.values())]
        high = [max(v) - m for m, v in zip(means, bars.values())]
        ax.bar(range(len(names)), means, yerr=[low, high], capsize=4, color="#8fb3d9")
        for i, values in enumerate(bars.values()):
            ax.plot([i] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if chance and title in chance:
            ax.axhline(chance[title], color="#b04040", ls="--", lw=1, label="guessing")
            ax.legend(fontsize=7, loc="lower right")
    if reference is not None:
        ax = axes[0][-1]
        ax.bar(range(len(reference)), list(reference.values()), color="#c9c9c9")
        ax.set_xticks(range(len(reference)), list(reference), rotation=30, ha="right", fontsize=8)
        ax.set_ylim(min(reference.values()) - 5, 100)
        ax.set_title("paper (ScienceQA %)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_type_scores(results: dict[str, dict], chance: dict[str, float] | None = None, title: str = ""):
    """Accuracy per question type, one bar per row of ``results`` (``{name: evaluate.score(...)}``),
    and ``chance`` (per type, e.g. :func:`llava_lite.evaluate.guess_chance`) as a dashed mark across
    each type's bars: what guessing among the answers a question offers would score there."""
    types = list(next(iter(results.values()))["accuracy"])
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(types)), 3.6))
    for i, (name, res) in enumerate(results.items()):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(types))]
        ax.bar(xs, [res["accuracy"].get(t, 0.0) for t in types], width, label=name)
    for j, t in enumerate(types):
        if chance and t in chance:
            ax.hlines(
                chance[t], j - 0.45, j + 0.45, colors="black", linestyles="--", label="guessing" if j == 0 else None
            )
    ax.set_xticks(range(len(types)), types)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
