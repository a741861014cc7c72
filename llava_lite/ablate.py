"""The paper's ablations in miniature (§5, ScienceQA table): each row changes one choice against the
baseline, trains stages 1 and 2 again at a preset with fixed seeds, and is scored twice: the
exact-answer score on the ``test`` scenes and the accuracy on the world's multiple-choice set.

Rows (``ROWS``): the baseline (penultimate layer, stage 1, the preset's projector, reasoning
first); the last layer's features; no stage 1 (the projector starts random in stage 2); the
paper's ``linear`` projector; answers first; a smaller language model (``tiny-lm-small``, half
the shipped LM's parameters by the same pretraining recipe, as the paper's 7B is about half its
13B). Stage 2 trains on the instruction data of notebook 01
and the multiple-choice ``train`` split together, so one run yields both scores.

Every finished (row, seed) is one line of ``results.jsonl`` in the output folder: a rerun skips
what is done, so a stopped run resumes at the next unit. :func:`table` puts the rows beside the
paper's numbers with the spread over seeds.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import io, jsonl, scienceqa, stages, viz
from .config import Preset, get_preset
from .conversation import get_template
from .evaluate import ask_llava, exact_items, records, score
from .paths import REPO_DIR, Layout
from .train import latest_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One line of the ablation table: what it changes, and the paper's ScienceQA accuracy for it."""

    name: str
    layer: int = -2
    projector: str | None = None  # None: the preset's
    stage1: bool = True
    answer_format: str = "reasoning-first"
    lm: str | None = None  # None: the preset's language model; else a name in data/pretrained/, a folder or a hub id
    paper: float | None = None  # ScienceQA accuracy (%) in the paper's ablation table
    changes: str = ""


ROWS = (
    Row("baseline", paper=90.92, changes="penultimate layer, stage 1, the preset's projector, reasoning first"),
    Row("last layer", layer=-1, paper=89.96, changes="features of the last layer instead of the penultimate"),
    Row("no stage 1", stage1=False, paper=85.81, changes="stage 2 from a random projector"),
    Row("linear projector", projector="linear", changes="one linear layer (the paper's) instead of mlp2x_gelu"),
    Row("answer first", answer_format="answer-first", paper=89.77, changes="the answer before its reasoning"),
    Row(
        "smaller LM",
        lm="tiny-lm-small",
        paper=89.84,
        changes="a language model of 2 layers instead of 4 (0.49M parameters instead of 0.92M; "
        "the paper: 7B instead of 13B)",
    ),
)
DOCS_RESULTS = REPO_DIR / "docs" / "ablations.jsonl"  # the full-size results, committed beside docs/ablations.md
PAPER_NOTE = (
    "ScienceQA accuracy of LLaVA (Vicuna-13B; the smaller LM row: Vicuna-7B), Table 8; "
    "the linear row has no paper figure"
)


def row_named(name: str) -> Row:
    for row in ROWS:
        if row.name == name:
            return row
    raise ValueError(f"no ablation row {name!r}; rows are {[r.name for r in ROWS]}")


def row_preset(preset: Preset, row: Row) -> Preset:
    """``preset`` with the row's layer, projector and language model (a copy; the preset itself is untouched)."""
    model = replace(preset.model, projector_type=row.projector or preset.model.projector_type)
    language = replace(preset.language, name=row.lm or preset.language.name)
    return replace(preset, vision=replace(preset.vision, layer=row.layer), model=model, language=language)


def _keyed(samples: Sequence[dict], split: str) -> list[dict]:
    """Instruction samples with their image named ``<split>/<file>``, as the multiple-choice set names its own."""
    return [dict(s, image=f"{split}/{s['image']}") if s.get("image") else dict(s) for s in samples]


def run_unit(
    preset_name: str,
    row: Row,
    seed: int,
    out: Path,
    mc_data: Path,
    stage1_steps: int = 0,
    stage2_steps: int = 0,
    eval_limit: int = 0,
    batch_size: int = 0,
    train_limit: int = 0,
    progress: bool = False,
) -> dict:
    """Train and score one (row, seed): stage 1 (unless the row skips it), stage 2 on the
    instruction data plus the multiple-choice ``train`` split, then both scores on ``test``.
    ``*_steps`` and ``batch_size`` (0: the preset's), ``eval_limit`` (0: every question) and
    ``train_limit`` (0: every sample; else the first that many of each stage's training samples)
    make reduced runs."""
    t0 = time.perf_counter()
    base, layout = get_preset(preset_name), Layout.for_preset(preset_name)
    preset = row_preset(base, row)
    tower = stages.load_vision(preset.vision)
    feats = scienceqa.world_features(layout, tower, ("train", "test"))
    lm, tokenizer = stages.load_language(preset.language)
    model = stages.build_llava(preset, lm, tokenizer, tower, seed=seed)
    folder = out / f"{row.name.replace(' ', '-')}-s{seed}"
    stage1, steps1 = None, 0
    if row.stage1:
        s1 = {k: v for k, v in (("max_steps", stage1_steps), ("batch_size", batch_size)) if v}
        captions = _keyed(stages.stage_samples(layout, "train", 1), "train")[: train_limit or None]
        run1 = folder / "stage1"
        steps1 = stages.run_stage(
            preset, model, tokenizer, feats, 1, captions, run1, progress=progress, seed=seed, **s1
        )
        steps1, stage1 = steps1["steps"], latest_checkpoint(run1)
    stages.prepare_stage2(preset, model, stage1, seed=seed)
    problems = scienceqa.read_split(mc_data, "train")
    mix = _keyed(stages.stage_samples(layout, "train", 2), "train") + scienceqa.to_samples(problems, row.answer_format)
    if train_limit:  # the same share of instruction and multiple-choice samples, drawn with the seed
        mix = random.Random(seed).sample(mix, min(train_limit, len(mix)))
    s2 = {k: v for k, v in (("max_steps", stage2_steps), ("batch_size", batch_size)) if v}
    run2 = folder / "stage2"
    summary = stages.run_stage(preset, model, tokenizer, feats, 2, mix, run2, progress=progress, seed=seed, **s2)
    template = get_template(preset.model.stage2_template, tokenizer)
    items = exact_items(io.read_json(layout.instruct / "test.json"))[: eval_limit or None]
    items = [replace(it, image=f"test/{it.image}") for it in items]
    exact = score(records(items, ask_llava(model, template, tokenizer, items, feats)))
    mc_test = scienceqa.read_split(mc_data, "test")[: eval_limit or None]
    mc, _ = scienceqa.evaluate_mc(model, tokenizer, template, mc_test, feats)
    return {
        "row": row.name,
        "seed": seed,
        "preset": preset_name,
        "row_settings": asdict(row),
        "stage1_steps": steps1,
        "stage2_steps": summary["steps"],
        "stage2_examples": summary.get("examples"),
        "exact": exact["overall"],
        "exact_by_type": exact["accuracy"],
        "mc": mc["overall"],
        "mc_by_category": mc["accuracy"],
        "mc_unparseable": mc["unparseable"],
        "mc_named": mc["named"],
        "mc_chance": mc["chance"],
        "mc_questions": mc["questions"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _worker_start(threads: int) -> None:
    """A unit's process: its share of the cores, and no stalls on denormal numbers."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.WARNING)


def run(
    preset_name: str,
    out: Path,
    rows: Sequence[Row] = ROWS,
    seeds: Sequence[int] = (0, 1),
    mc_data: Path | None = None,
    progress: bool = True,
    jobs: int = 1,
    **reduced,
) -> list[dict]:
    """Every (row, seed) not yet in ``out/results.jsonl``; returns all results. ``jobs`` > 1 trains
    that many units at once, each in its own process with ``cores // jobs`` threads (at the tiny
    preset's small matrices, two one-thread units get more from two cores than one two-thread
    unit); a result is written as soon as its unit ends, so a stopped run loses only the units in
    flight. ``reduced``: :func:`run_unit`'s step and question limits, recorded with each result."""
    layout = Layout.for_preset(preset_name)
    mc_data = Path(mc_data) if mc_data else layout.scienceqa
    if not (mc_data / "problems.json").exists():
        log.info("writing the world's multiple-choice set into %s", mc_data)
        scienceqa.write_world_set(layout, mc_data)
    scienceqa.check_world(mc_data, layout)
    path = Path(out) / "results.jsonl"
    tag = json.dumps(dict(sorted(reduced.items()))) if any(reduced.values()) else None
    done = {(r["row"], r["seed"], r.get("reduced")) for _, r in jsonl.read_jsonl(path)} if path.exists() else set()
    todo = [(row, seed) for row in rows for seed in seeds if (row.name, seed, tag) not in done]

    def keep(result: dict) -> None:
        result["reduced"] = tag
        with jsonl.open_for_append(path) as f:
            jsonl.append(f, result)
        log.info(
            "ablation %s, seed %d: exact %.3f, mc %.3f", result["row"], result["seed"], result["exact"], result["mc"]
        )

    if jobs <= 1:
        for row, seed in todo:
            log.info("ablation %s, seed %d", row.name, seed)
            keep(run_unit(preset_name, row, seed, Path(out), mc_data, progress=progress, **reduced))
    elif todo:
        base = get_preset(preset_name)
        visions = {repr(v): v for v in (row_preset(base, row).vision for row, _ in todo)}
        for vision in visions.values():  # each cache made once, before the workers read it
            scienceqa.world_features(Layout.for_preset(preset_name), stages.load_vision(vision), ("train", "test"))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        log.info("%d units, %d at a time with %d thread(s) each", len(todo), jobs, threads)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_worker_start, initargs=(threads,)) as pool:
            units = [pool.submit(run_unit, preset_name, row, seed, Path(out), mc_data, **reduced) for row, seed in todo]
            for unit in as_completed(units):
                keep(unit.result())
    return [r for _, r in jsonl.read_jsonl(path) if r.get("reduced") == tag]


def table(results: Sequence[dict]) -> list[dict]:
    """One row per ablation row: mean and spread (max - min) over its seeds of both scores, the
    difference from the baseline's mean, and the paper's number and difference."""
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    base = by_row.get("baseline")
    base_exact = statistics.mean(r["exact"] for r in base) if base else None
    base_mc = statistics.mean(r["mc"] for r in base) if base else None
    paper_base = row_named("baseline").paper
    out = []
    for row in ROWS:
        runs = by_row.get(row.name)
        if not runs:
            continue
        exact = [r["exact"] for r in runs]
        mc = [r["mc"] for r in runs]
        line = {
            "row": row.name,
            "seeds": len(runs),
            "exact": round(statistics.mean(exact), 3),
            "exact spread": round(max(exact) - min(exact), 3),
            "mc": round(statistics.mean(mc), 3),
            "mc spread": round(max(mc) - min(mc), 3),
        }
        named = [r["mc_named"] for r in runs if "mc_named" in r]
        if named:  # the reasoning names the right option, whatever letter follows
            line["option named"] = round(statistics.mean(named), 3)
        if base_exact is not None:
            line["exact vs baseline"] = round(statistics.mean(exact) - base_exact, 3)
            line["mc vs baseline"] = round(statistics.mean(mc) - base_mc, 3)
        line["paper"] = row.paper
        line["paper vs baseline"] = round(row.paper - paper_base, 2) if row.paper is not None else None
        out.append(line)
    return out


def report(results: Sequence[dict], command: str, seconds: float, date: str) -> str:
    """The results file's text: the command and date that made it, its wall time, the table, and
    every (row, seed) with its per-type scores, so a reader can check each mean."""
    lines = [
        "# Ablations in miniature",
        "",
        f"Made by `{command}` on {date}; wall time {seconds / 60:.1f} min for the units this run trained "
        "(units already in the results file are read, not retrained).",
        "",
        "`exact`: the exact-answer score on the `test` scenes; `mc`: accuracy on the world's multiple-choice "
        "`test` split; `option named`: the share of multiple-choice replies whose words name the right option "
        "and no other, whatever letter they give; spread: max - min over the seeds; `paper`: " + PAPER_NOTE + ".",
        "",
        viz.table(table(results)),
        "",
        "## Every run",
        "",
    ]
    runs = [
        {
            "row": r["row"],
            "seed": r["seed"],
            "exact": r["exact"],
            "mc": r["mc"],
            "mc unparseable": r["mc_unparseable"],
            "option named": round(r["mc_named"], 3) if "mc_named" in r else "-",
            "stage 1 steps": r["stage1_steps"],
            "stage 2 steps": r["stage2_steps"],
            "minutes": round(r["seconds"] / 60, 1),
            **{t: round(v, 3) for t, v in r["exact_by_type"].items()},
        }  # fmt: skip
        for r in results
    ]
    lines.append(viz.table(runs))
    return "\n".join(lines) + "\n"


def saved_results(preset_name: str, docs: Path = DOCS_RESULTS) -> tuple[list[dict], Path | None]:
    """The full-size results of ``preset_name`` that exist, and where they came from: the
    ``llava-lite ablate`` output (``outputs/<preset>/ablate/results.jsonl``) first, else the
    committed ``docs`` file; ``([], None)`` when neither holds any. Reduced runs are left out."""
    for path in (Layout.for_preset(preset_name).root / "ablate" / "results.jsonl", Path(docs)):
        if path.exists():
            found = [r for _, r in jsonl.read_jsonl(path) if r.get("preset") == preset_name and not r.get("reduced")]
            if found:
                return found, path
    return [], None


def by_row(results: Sequence[dict], key: str) -> dict[str, list[float]]:
    """``{row: [score of each seed]}`` for ``key`` (``exact`` or ``mc``), rows in the table's order."""
    out = {row.name: [r[key] for r in results if r["row"] == row.name] for row in ROWS}
    return {name: values for name, values in out.items() if values}


def compare(results: Sequence[dict], a: str, b: str, key: str = "mc") -> str:
    """One sentence on rows ``a`` and ``b``: their means over seeds, the difference, and whether the
    seeds' ranges overlap (then the difference is within what a reseed moves)."""
    rows = by_row(results, key)
    if a not in rows or b not in rows:
        return f"no results for {[n for n in (a, b) if n not in rows]}"
    va, vb = rows[a], rows[b]
    ma, mb = statistics.mean(va), statistics.mean(vb)
    overlap = min(va) <= max(vb) and min(vb) <= max(va)
    verdict = "the seeds' ranges overlap: within what a reseed moves" if overlap else "the seeds' ranges do not overlap"
    return (
        f"{a} {ma:.3f} (seeds {min(va):.3f}-{max(va):.3f}) vs {b} {mb:.3f} (seeds {min(vb):.3f}-{max(vb):.3f}): "
        + (f"{a} {'higher' if ma > mb else 'lower'} by {abs(ma - mb):.3f}; " if ma != mb else "equal means; ")
        + verdict
    )
