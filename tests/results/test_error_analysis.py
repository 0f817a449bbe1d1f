"""The error analysis's numbers against plain loops, its pictures at 1 and 500 classes, and the
ensemble's per-member speed on the trade-off picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from helpers import assert_picture, random_scores, save_random_checkpoint


def _data(y, s, classes=None, paths=None):
    from aicoss_cli.results.errors import LabeledScores

    classes = classes or [f"c{j}" for j in range(y.shape[1])]
    return LabeledScores("test scores", [f"img{i:04d}" for i in range(len(y))], classes, s.astype(np.float64), y,
                         paths or [None] * len(y))


def test_false_positives_and_negatives_are_those_of_a_plain_loop():
    from aicoss_cli.results.errors import false_negatives, false_positives

    y, s = random_scores(0, n=300, k=6, unannotated=0.1)
    t = np.array([0.5, 0.3, 0.7, 0.0, 1.0, 0.45])
    for j in range(y.shape[1]):
        fp = [i for i in range(len(y)) if y[i, j] == 0 and s[i, j] >= t[j]]
        fp.sort(key=lambda i: (-s[i, j], i))
        fn = [i for i in range(len(y)) if y[i, j] == 1 and s[i, j] < t[j]]
        fn.sort(key=lambda i: (s[i, j], i))
        rows, count = false_positives(y, s, t, j, 7)
        assert rows.tolist() == fp[:7] and count == len(fp)
        rows, count = false_negatives(y, s, t, j, 7)
        assert rows.tolist() == fn[:7] and count == len(fn)
    assert false_negatives(y, s, t, 3, 7)[1] == 0  # threshold 0: nothing is below it


def test_cooccurrence_counts_the_true_labels_of_each_classs_false_positives():
    from aicoss_cli.results.errors import fp_cooccurrence

    y, s = random_scores(1, n=300, k=5, unannotated=0.1)
    y[:20] = np.where(y[:20] == 1, 0, y[:20])  # images with no positive label at all
    t = np.full(5, 0.6)
    pairs, alone = fp_cooccurrence(y, s, t)
    expected = np.zeros((5, 5), dtype=np.int64)
    expected_alone = np.zeros(5, dtype=np.int64)
    for i in range(len(y)):
        for j in range(5):
            if y[i, j] == 0 and s[i, j] >= t[j]:
                for k in range(5):
                    expected[j, k] += y[i, k] == 1
                expected_alone[j] += not (y[i] == 1).any()
    assert (pairs == expected).all() and (alone == expected_alone).all()
    assert np.diag(pairs).sum() == 0 and expected_alone.sum() > 0


def test_suspects_are_the_confident_contradictions_most_confident_first():
    from aicoss_cli.results.errors import suspect_labels

    y = np.array([[1, 0, -1], [0, 1, 0], [1, 1, 0], [-1, 0, 1]], dtype=np.int8)
    # powers of two, so that 1 - s is exact and equal contradictions really tie
    s = np.array([[2**-7, 1 - 2**-7, 0.999], [0.97, 2**-6, 0.5], [2**-8, 0.99, 1 - 2**-6], [0.0, 1.0, 0.001]])
    rows, cols = suspect_labels(y, s, below=0.02, above=0.98)
    # by hand: contradiction = 1 - s of a positive, s of a negative; (0,2) and (3,0) are not annotated;
    # ties in row, then class order
    expected = [(3, 1), (3, 2), (2, 0), (0, 0), (0, 1), (1, 1), (2, 2)]
    assert list(zip(rows.tolist(), cols.tolist())) == expected


def test_the_gallery_holds_the_worst_classes_by_ap_worst_first():
    from aicoss_cli.results.errors import ErrorOptions, analyse

    y, s = random_scores(2, n=300, k=8, unannotated=0.1)
    s = np.clip(s + 0.25 * (y == 1) * np.arange(8) / 8, 0, 1)  # classes of growing skill
    a = analyse(_data(y, s), ErrorOptions(worst=3, per_row=4))
    ap = [average_precision_score(y[y[:, j] != -1, j] == 1, s[y[:, j] != -1, j]) for j in range(8)]
    assert [g.cls for g in a.worst] == list(np.argsort(ap)[:3])
    assert [r["ap"] for r in a.per_class] == pytest.approx(ap, abs=1e-12)
    assert all(len(g.fp) <= 4 and len(g.fn) <= 4 for g in a.worst)


def test_classes_option_takes_names_with_commas_whole():
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.results.errors import class_picture_names, pick_classes

    classes = ["a,b", "c", "d e", "ü$"]
    assert pick_classes(["a,b"], classes) == [0]
    assert pick_classes(["c,d e", "c"], classes) == [1, 2]
    with pytest.raises(UserError, match="'x' is not a class"):
        pick_classes(["c,x"], classes)
    assert class_picture_names(classes, [0, 2, 3]) == {0: "errors_a_b.png", 2: "errors_d_e.png", 3: "errors_class4.png"}


@pytest.mark.parametrize("k", [1, 500])
def test_pictures_read_well_with_one_class_and_with_500(tmp_path, k):
    from aicoss_cli.results.errors import ErrorOptions, analyse
    from aicoss_cli.results.gallery import draw_error_analysis

    rng = np.random.default_rng(k)
    y = (rng.random((400, k)) < 0.2).astype(np.int8)
    s = np.clip(0.4 * y + rng.random((400, k)) * 0.7, 0, 1)
    hostile = ['say "hi" & <b>', "rain 🌧", "$x$ cost", "a" * 200]
    classes = (hostile + [f"class {j}" for j in range(k)])[:k]
    a = analyse(_data(y, s, classes), ErrorOptions(classes=[classes[0]]))
    targets = {key: tmp_path / f"{key}.png" for key in ("errors", "pr_curves", "cooccurrence", "errors_0")}
    pictures = draw_error_analysis(a, targets)
    assert set(pictures) == set(targets)
    for path in pictures.values():
        assert_picture(path)
    assert len(a.worst) == min(k, 6)
    # no img_path known: every shown image is a grey box, and a note says so once
    assert len(a.unreadable) == len(a.shown_rows()) and len(a.notes) == 1 and "could not be read" in a.notes[0]
    with Image.open(pictures["errors"]) as img:
        assert img.height < 2600  # six classes, not 500


def test_ensemble_records_each_members_speed_and_the_tradeoff_draws_it(run_cli, demo_root, tmp_path):
    from aicoss_cli.results.ensembles import load_ensemble
    from aicoss_cli.results.pictures import draw_tradeoff, tradeoff_points

    a = save_random_checkpoint(tmp_path / "a.safetensors", demo_root, img_size=32, seed=1)
    b = save_random_checkpoint(tmp_path / "b.safetensors", demo_root, img_size=24, seed=2)
    result = run_cli("ensemble", a, b, "--out", tmp_path / "sub.csv", "--json")
    assert result.code == 0, result.stderr
    saved = json.loads((tmp_path / "sub.json").read_text())
    speeds = [m["img_per_s"] for m in saved["members"]]
    assert all(v > 0 for v in speeds)
    # each member's own forward is part of the ensemble's time, which also decodes the images
    assert sum(saved["n_test"] / v for v in speeds) < saved["n_test"] / saved["img_per_s"]
    ens = load_ensemble(tmp_path / "sub.json")
    _, by_speed = tradeoff_points([], [ens])
    members = [p for p in by_speed if p["kind"] == "member"]
    assert [p["x"] for p in members] == speeds
    assert [p["y"] for p in members] == [m["val_map"] for m in saved["members"]]
    assert [p["kind"] for p in by_speed].count("ensemble") == 1
    assert_picture(draw_tradeoff([], [ens], tmp_path / "tradeoff.png"))

    # a result written before members' speed was recorded still reads, without member points
    for m in saved["members"]:
        del m["img_per_s"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    old = load_ensemble(tmp_path / "old.json")
    assert [m.img_per_s for m in old.members] == [None, None]
    assert [p["kind"] for p in tradeoff_points([], [old])[1]] == ["ensemble"]
