"""The report pictures, drawn from run folders: curves, per-class AP, the AP table, the Pareto front."""

from __future__ import annotations

import numpy as np

from helpers import assert_picture


def test_draw_curves_is_what_the_trainer_calls_after_each_epoch(runs):
    from aicoss_cli.results.pictures import draw_curves, is_report_picture

    path = draw_curves([runs[0]], runs[0] / "curves.png")
    assert path == runs[0] / "curves.png" and is_report_picture(path)
    assert_picture(path)
    assert not [p for p in runs[0].iterdir() if p.name.endswith(".tmp")]


def test_class_names_with_quotes_commas_emoji_and_dollars_are_drawn(runs, tmp_path):
    from aicoss_cli.results.pictures import draw_per_class_ap
    from aicoss_cli.results.runs import ClassAP, load_run

    names = ['say "hi"', "a,b", "rain 🌧", "$x$ cost", "$", "no positive"] + [f"c{i}" for i in range(70)]
    ap = np.linspace(0.1, 0.9, len(names))
    ap[5] = np.nan
    a = ClassAP(classes=names, ap=ap, positives=np.ones(len(names), int), n_val=10)
    path = draw_per_class_ap([load_run(runs[0])], [a], tmp_path / "p.png")
    assert_picture(path)


def test_ap_table_sorts_weakest_first_and_marks_five():
    from aicoss_cli.results.pictures import ap_table
    from aicoss_cli.results.runs import ClassAP

    a = ClassAP(["a", "b", "c", "d", "e", "f", "g"], np.array([0.9, 0.2, np.nan, 0.5, 0.1, 0.7, 0.35]),
                np.ones(7, int), 10)
    b = ClassAP(["b", "a", "h"], np.array([0.4, 0.7, 0.6]), np.ones(3, int), 10)
    t = ap_table([a, b])
    assert t.classes == ["a", "b", "c", "d", "e", "f", "g", "h"]
    # means: a .8, b .3, c -, d .5, e .1, f .7, g .35, h .6 (by hand)
    assert [t.classes[i] for i in t.order] == ["e", "b", "g", "d", "h", "f", "a", "c"]
    assert {t.classes[i] for i in t.weak} == {"e", "b", "g", "d", "h"}
    assert np.isnan(t.matrix[7, 0]) and t.matrix[7, 1] == 0.6


def test_pareto_front_keeps_the_points_nothing_beats():
    from aicoss_cli.results.pictures import pareto_front

    points = [{"x": 10, "y": 0.5}, {"x": 20, "y": 0.7}, {"x": 30, "y": 0.6}, {"x": 5, "y": 0.3}, {"x": 40, "y": 0.8}]
    assert [p["x"] for p in pareto_front(points, lower_x_is_better=True)] == [5, 10, 20, 40]
    assert [p["x"] for p in pareto_front(points, lower_x_is_better=False)] == [40]
