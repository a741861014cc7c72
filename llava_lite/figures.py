"""The course's two pictures, drawn as SVG text: LLaVA's architecture (the paper's Figure 1, in our
own drawing, with the paper's sizes beside the ``tiny`` preset's) and the roadmap of the notebooks
with "you are here". The files under ``notebooks/figures/`` are written by :func:`write_all`; a test
checks they match this code, so a picture never drifts from what it describes."""

from __future__ import annotations

from html import escape
from pathlib import Path

from . import io

FOLDER = Path(__file__).resolve().parent.parent / "notebooks" / "figures"

# (number, short title, paper section) of every lesson, in order
LESSONS = (
    ("00", "setup and the world", "§3 §4"),
    ("01", "instruction data", "§3"),
    ("02", "CLIP features", "§4"),
    ("03", "stage 1: alignment", "§4.2"),
    ("04", "stage 2: fine-tuning", "§4.2"),
    ("05", "evaluation", "§5"),
    ("06", "chat and export", ""),
)

FONT = "font-family='Helvetica, Arial, sans-serif'"
COLOURS = {"frozen": "#dfe7f2", "trained": "#fde3c8", "data": "#eeeeee", "edge": "#444444", "here": "#d9480f"}


def _box(x, y, w, h, fill, lines, bold_first=True, size=13) -> str:
    out = [f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='8' fill='{fill}' stroke='{COLOURS['edge']}'/>"]
    step = size + 4
    top = y + h / 2 - (len(lines) - 1) * step / 2 + size / 3
    for k, text in enumerate(lines):
        weight = " font-weight='bold'" if bold_first and k == 0 else ""
        small = size if k == 0 else size - 2
        out.append(
            f"<text x='{x + w / 2}' y='{top + k * step}' text-anchor='middle' font-size='{small}'{weight}>"
            f"{escape(text)}</text>"
        )
    return "\n".join(out)


def _arrow(x0, y0, x1, y1, label: str = "", dx: float = 0, dy: float = -6) -> str:
    out = f"<line x1='{x0}' y1='{y0}' x2='{x1}' y2='{y1}' stroke='{COLOURS['edge']}' marker-end='url(#head)'/>"
    if label:
        out += (
            f"\n<text x='{(x0 + x1) / 2 + dx}' y='{(y0 + y1) / 2 + dy}' text-anchor='middle' font-size='11' "
            f"font-style='italic'>{escape(label)}</text>"
        )
    return out


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    head = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {FONT}>\n<title>{escape(title)}</title>\n"
        "<defs><marker id='head' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
        f"orient='auto-start-reverse'><path d='M 0 0 L 10 5 L 0 10 z' fill='{COLOURS['edge']}'/></marker></defs>\n"
        f"<rect width='{width}' height='{height}' fill='white'/>\n"
    )
    return head + "\n".join(body) + "\n</svg>\n"


def architecture_svg() -> str:
    """LLaVA: image -> frozen CLIP ViT -> Z_v -> projection W -> H_v, beside the instruction's
    embeddings H_q, into the language model, which writes the answer X_a. Each part carries the
    paper's size and the ``tiny`` preset's, and what each training stage updates."""
    b = []
    b.append(_box(20, 30, 120, 56, COLOURS["data"], ["image X_v", "224 px · tiny: 64 px"]))
    b.append(_arrow(140, 58, 210, 58))
    b.append(
        _box(210, 22, 170, 72, COLOURS["frozen"], ["vision encoder", "CLIP ViT-L/14 (frozen)", "tiny: ViT, 4 layers"])
    )
    b.append(_arrow(380, 58, 480, 58, "Z_v", dy=-8))
    b.append(_text(430, 76, "256 x 1024", 10))
    b.append(_text(430, 89, "tiny: 64 x 64", 10))
    b.append(_box(480, 22, 170, 72, COLOURS["trained"], ["projection W", "H_v = W · Z_v", "trains in stages 1 and 2"]))
    b.append(_box(480, 150, 170, 56, COLOURS["data"], ["instruction X_q", "tokens -> embeddings H_q"]))
    b.append(
        _box(
            740,
            70,
            180,
            100,
            COLOURS["trained"],
            ["language model f_φ", "Vicuna-13B", "tiny: Llama, 4 x 128", "trains in stage 2 only"],
        )
    )
    b.append(_arrow(650, 58, 740, 95, "H_v: image tokens", dx=22, dy=-16))
    b.append(_arrow(650, 178, 740, 150, "H_q", dy=16))
    b.append(_box(970, 92, 130, 56, COLOURS["data"], ["answer X_a", "loss on its tokens"]))
    b.append(_arrow(920, 120, 970, 120))
    b.append(_legend(20, 245))
    return _svg(1120, 275, b, "LLaVA: a frozen CLIP, a projection, a language model")


def _text(x, y, text, size=11, anchor="middle", extra="") -> str:
    return f"<text x='{x}' y='{y}' text-anchor='{anchor}' font-size='{size}'{extra}>{escape(text)}</text>"


def _legend(x, y) -> str:
    items = [(COLOURS["frozen"], "frozen"), (COLOURS["trained"], "trained"), (COLOURS["data"], "data")]
    out = []
    for k, (fill, name) in enumerate(items):
        out.append(f"<rect x='{x + k * 110}' y='{y - 11}' width='14' height='14' fill='{fill}' stroke='#444'/>")
        out.append(_text(x + k * 110 + 20, y, name, 12, "start"))
    return "\n".join(out)


def roadmap_svg(here: str) -> str:
    """The seven lessons in a row, the paper section of each under it, ``here`` marked."""
    if here not in {n for n, _, _ in LESSONS}:
        raise ValueError(f"no lesson {here!r}; lessons are {[n for n, _, _ in LESSONS]}")
    w, gap, y = 128, 14, 24
    b = []
    for k, (num, title, section) in enumerate(LESSONS):
        x = 10 + k * (w + gap)
        mine = num == here
        fill = COLOURS["trained"] if mine else COLOURS["data"]
        stroke = COLOURS["here"] if mine else COLOURS["edge"]
        b.append(
            f"<rect x='{x}' y='{y}' width='{w}' height='50' rx='8' fill='{fill}' stroke='{stroke}' "
            f"stroke-width='{3 if mine else 1}'/>"
        )
        b.append(_text(x + w / 2, y + 21, num, 14, extra=" font-weight='bold'"))
        b.append(_text(x + w / 2, y + 39, title, 11))
        if section:
            b.append(_text(x + w / 2, y + 66, section, 10))
        if mine:
            b.append(_text(x + w / 2, y - 8, "you are here", 11, extra=f" fill='{COLOURS['here']}' font-weight='bold'"))
        if k:
            b.append(_arrow(x - gap, y + 25, x, y + 25))
    return _svg(10 + len(LESSONS) * (w + gap), 100, b, f"the course, at lesson {here}")


def figures() -> dict[str, str]:
    """Every committed figure: file name -> SVG text."""
    out = {"llava.svg": architecture_svg()}
    out.update({f"roadmap_{num}.svg": roadmap_svg(num) for num, _, _ in LESSONS})
    return out


def write_all(folder: Path = FOLDER) -> list[Path]:
    """Write :func:`figures` into ``folder`` (the notebooks' ``figures/``); returns the paths."""
    paths = []
    for name, text in figures().items():
        io.write_text(folder / name, text)
        paths.append(folder / name)
    return paths
