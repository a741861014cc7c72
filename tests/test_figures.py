"""The course's pictures: the committed SVG files are what ``llava_lite.figures`` draws, every
lesson notebook opens with its roadmap and the architecture, and the roadmap knows every lesson."""

import json
import xml.etree.ElementTree as ET

import pytest

from llava_lite import figures, tutorial


@pytest.mark.parametrize("name", sorted(figures.figures()))
def test_committed_figure_is_what_the_code_draws(name):
    path = figures.FOLDER / name
    assert path.exists(), f"{path} is missing: run `python -c 'from llava_lite import figures; figures.write_all()'`"
    assert path.read_text(encoding="utf-8") == figures.figures()[name], f"{path} is stale: rerun figures.write_all()"
    ET.fromstring(path.read_text(encoding="utf-8"))  # well-formed SVG


def test_every_notebook_opens_with_its_roadmap_and_the_architecture():
    lessons = {num for num, _, _ in figures.LESSONS}
    for path in tutorial.notebooks():
        num = path.name[:2]
        assert num in lessons, f"{path.name}: not on the roadmap (figures.LESSONS)"
        first = "".join(json.loads(path.read_text(encoding="utf-8"))["cells"][0]["source"])
        assert f"(figures/roadmap_{num}.svg)" in first and "(figures/llava.svg)" in first, path.name


def test_roadmap_marks_the_lesson_and_refuses_an_unknown_one():
    svg = figures.roadmap_svg("03")
    assert svg.count("you are here") == 1 and "stage 1: alignment" in svg
    with pytest.raises(ValueError, match="no lesson '07'"):
        figures.roadmap_svg("07")
