"""benchmarks/svg_plot.py: the SVG parses, and each point lands where its value puts it on the axes (hand-computed)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from svg_plot import BOTTOM, H, LEFT, RIGHT, TOP, W, Point, scatter  # noqa: E402

NS = "{http://www.w3.org/2000/svg}"


def test_log_scatter_places_points_on_decades(tmp_path):
    path = tmp_path / "p.svg"
    scatter([Point(1.0, 1.0, "a"), Point(2.0, 100.0, "b"), Point(1.5, 10.0, "c & d")], path,
            title="t", xlabel="x", ylabel="y", log_y=True)
    root = ET.parse(path).getroot()  # well-formed XML (the label's & is escaped)
    circles = {(round(float(c.get("cx")), 1), round(float(c.get("cy")), 1)) for c in root.iter(NS + "circle")}
    # x ticks 1.0 .. 2.0 span the plot width; y decades 10^0 .. 10^2 span its height
    x_of = lambda x: LEFT + (x - 1.0) / 1.0 * (W - LEFT - RIGHT)  # noqa: E731
    y_of = lambda d: H - BOTTOM - d / 2 * (H - TOP - BOTTOM)  # noqa: E731
    assert circles == {(round(x_of(1.0), 1), round(y_of(0), 1)), (round(x_of(2.0), 1), round(y_of(2), 1)),
                       (round(x_of(1.5), 1), round(y_of(1), 1))}
    labels = [t.text for t in root.iter(NS + "text")]
    assert "c & d" in labels and {"1", "10", "100"} <= set(labels)


def test_log_axis_refuses_nonpositive(tmp_path):
    with pytest.raises(ValueError, match="b"):
        scatter([Point(1.0, 1.0, "a"), Point(2.0, -3.0, "b")], tmp_path / "p.svg", title="t", xlabel="x",
                ylabel="y", log_y=True)
