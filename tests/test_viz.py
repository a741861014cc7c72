"""Notebook pictures: what they draw, read back from the figure."""

import matplotlib

matplotlib.use("Agg")

from llava_lite import viz  # noqa: E402


def test_seed_bars_stand_at_the_mean_with_error_bars_from_the_lowest_to_the_highest_seed():
    fig = viz.plot_seed_bars({"mc": {"baseline": [0.5, 0.7], "answer first": [0.4]}}, {"baseline": 90.92})
    mc, paper = fig.axes
    assert [round(b.get_height(), 6) for b in mc.patches] == [0.6, 0.4]
    caps = sorted(round(y, 6) for line in mc.lines for y in line.get_ydata())
    assert 0.5 in caps and 0.7 in caps  # the whiskers (and the seeds' dots) reach both seeds
    assert [t.get_text() for t in mc.get_xticklabels()] == ["baseline", "answer first"]
    assert [b.get_height() for b in paper.patches] == [90.92] and paper.get_title() == "paper (ScienceQA %)"
    assert len(viz.plot_seed_bars({"a": {"x": [1.0]}}).axes) == 1


def test_type_scores_draw_a_bar_per_row_and_type_and_guessing_across_each_type():
    results = {
        "llava": {"accuracy": {"count": 0.8, "position": 0.5}},
        "reader": {"accuracy": {"count": 1.0, "position": 0.66}},
    }
    fig = viz.plot_type_scores(results, {"count": 0.25, "position": 0.5})
    (ax,) = fig.axes
    assert [round(b.get_height(), 6) for b in ax.patches] == [0.8, 0.5, 1.0, 0.66]
    segments = [seg for marks in ax.collections for seg in marks.get_segments()]  # a dashed segment per type
    assert [[(round(x, 6), round(y, 6)) for x, y in seg] for seg in segments] == [
        [(-0.45, 0.25), (0.45, 0.25)],
        [(0.55, 0.5), (1.45, 0.5)],
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["count", "position"]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"llava", "reader", "guessing"}
