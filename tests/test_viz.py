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


def test_seed_bars_draw_guessing_as_a_dashed_line_on_the_panels_that_name_it():
    fig = viz.plot_seed_bars({"exact": {"baseline": [0.9]}, "mc": {"baseline": [0.4, 0.5]}}, chance={"mc": 0.363})
    exact, mc = fig.axes
    dashed = [line for line in mc.lines if line.get_linestyle() == "--"]
    assert [tuple(line.get_ydata()) for line in dashed] == [(0.363, 0.363)]
    assert not [line for line in exact.lines if line.get_linestyle() == "--"]


def test_patch_pca_draws_the_patch_grid_on_both_rows_and_wraps_long_titles_whole():
    import torch
    from PIL import Image

    title = "A picture of a small red circle to the left of a large blue square."
    fig = viz.show_patch_pca([Image.new("RGB", (32, 32))], [torch.rand(4, 4, 3)], [title])
    image_ax, map_ax = fig.axes
    assert len(image_ax.lines) == len(map_ax.lines) == 2 * 3  # 3 inner vertical + 3 horizontal lines
    assert sorted({round(x, 6) for line in image_ax.lines for x in line.get_xdata()}) == [0.0, 1.0, 8.0, 16.0, 24.0]
    assert image_ax.get_title().replace("\n", " ") == title and "\n" in image_ax.get_title()


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
