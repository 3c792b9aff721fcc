"""Plots: a run that blew up does not flatten the others, coinciding lines are named."""

from __future__ import annotations

import pytest

from metaoptimize import plotting


def test_lines_that_coincide_are_labelled_with_the_line_they_hide() -> None:
    x = [1.0, 2.0, 3.0]
    series = [
        plotting._Series("a", x, [3.0, 2.0, 1.0], "-"),
        plotting._Series("b", x, [3.0, 2.0, 1.0], "-"),
        plotting._Series("c", x, [3.0, 2.5, 1.0], "-"),
        plotting._Series("d", x, [3.0, 2.0, 1.0 + 1e-12], "-"),
    ]
    labels = [s.label for s in plotting._mark_duplicates(series)]
    assert labels == ["a", "b (same as a)", "c", "d (same as a)"]


def test_the_y_range_follows_the_runs_that_did_not_blow_up() -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    figure, axis = plt.subplots()
    axis.plot([1, 2, 3], [1e21, 1e10, 1.0])  # blew up: drawn, but not in the range
    axis.plot([1, 2, 3], [2.0, 1.0, 0.5])
    axis.set_yscale("log")
    plotting._clip_to(axis, [2.0, 1.0, 0.5])
    low, high = axis.get_ylim()
    assert low == pytest.approx(0.5 / 1.5)
    assert high == pytest.approx(3.0)
    plt.close(figure)
