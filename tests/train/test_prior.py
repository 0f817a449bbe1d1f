"""The class prior of P-ASL: CSV matched by name, atomic writes, label frequencies."""

from __future__ import annotations

import os

import pytest
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.losses.registry import build_loss
from aicoss_cli.train import prior as prior_module
from aicoss_cli.train.prior import label_prior, prior_has_effect, read_prior_csv, write_prior_csv

CLASSES = ["forest", "river", "road", "farm", "urban"]
VALUES = {"forest": 0.5, "river": 0.02, "road": 0.25, "farm": 0.01, "urban": 0.125}
SHUFFLED = ["farm", "forest", "urban", "river", "road"]


def write_text(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_reordered_csv_gives_the_same_prior_and_the_same_loss(tmp_path):
    in_order, reordered = tmp_path / "in_order.csv", tmp_path / "reordered.csv"
    write_text(in_order, ["Classes,avg_pred"] + [f"{c},{VALUES[c]}" for c in CLASSES])
    write_text(reordered, ["Classes,avg_pred"] + [f"{c},{VALUES[c]}" for c in SHUFFLED])

    expected = torch.tensor([VALUES[c] for c in CLASSES], dtype=torch.float32)
    first, second = read_prior_csv(in_order, CLASSES), read_prior_csv(reordered, CLASSES)
    assert first.dtype == torch.float32
    assert torch.equal(first, expected) and torch.equal(second, expected)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen)
    targets = torch.randint(-1, 2, (6, 5), generator=gen)
    targets[:, 0] = -1  # class "forest" (prior 0.5) has unannotated entries to drop
    loss_in_order = build_loss("pasl", likelihood_topk=0, prior=first)(logits, targets)
    loss_reordered = build_loss("pasl", likelihood_topk=0, prior=second)(logits, targets)
    by_row_order = build_loss("pasl", likelihood_topk=0, prior=[VALUES[c] for c in SHUFFLED])
    assert loss_in_order.item() == loss_reordered.item()
    assert by_row_order(logits, targets).item() != loss_in_order.item()  # so matching matters


def test_write_then_read_round_trips(tmp_path):
    path = tmp_path / "sub" / "prior.csv"
    values = torch.tensor([0.1, 0.2, 1 / 3, 0.0, 1.0])
    write_prior_csv(path, CLASSES, values)
    assert path.read_text().splitlines()[0] == "Classes,avg_pred"
    assert torch.equal(read_prior_csv(path, CLASSES), values)


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "prior.csv"
    write_prior_csv(path, CLASSES, [0.5] * 5)
    write_prior_csv(path, CLASSES, [0.25] * 5)  # over an existing file
    assert os.listdir(tmp_path) == ["prior.csv"]
    assert torch.equal(read_prior_csv(path, CLASSES), torch.full((5,), 0.25))


def test_failed_write_keeps_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "prior.csv"
    write_prior_csv(path, CLASSES, [0.5] * 5)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(prior_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_prior_csv(path, CLASSES, [0.25] * 5)
    assert os.listdir(tmp_path) == ["prior.csv"]
    assert path.read_bytes() == before


def test_missing_class_is_an_error_naming_file_and_class(tmp_path):
    path = tmp_path / "prior.csv"
    write_text(path, ["Classes,avg_pred"] + [f"{c},0.1" for c in CLASSES if c != "road"])
    with pytest.raises(UserError, match=r"prior\.csv.*missing class\(es\) 'road'"):
        read_prior_csv(path, CLASSES)


def test_extra_class_is_an_error_naming_file_and_class(tmp_path):
    path = tmp_path / "prior.csv"
    write_text(path, ["Classes,avg_pred"] + [f"{c},0.1" for c in CLASSES + ["glacier"]])
    with pytest.raises(UserError, match=r"prior\.csv.*not in the data 'glacier'"):
        read_prior_csv(path, CLASSES)


def test_many_missing_classes_are_listed_briefly(tmp_path):
    classes = [f"class_{i}" for i in range(40)]
    path = tmp_path / "prior.csv"
    write_text(path, ["Classes,avg_pred", "class_0,0.5"])
    with pytest.raises(UserError, match=r"'class_1', .*'class_5' and 34 more"):
        read_prior_csv(path, classes)


@pytest.mark.parametrize("lines, fragment", [
    (["Classes,avg_pred"] + [f"{c},0.1" for c in CLASSES] + ["river,0.2"],
     "class listed more than once: 'river'"),
    (["Classes,avg_pred"] + [f"{c},{'high' if c == 'farm' else 0.1}" for c in CLASSES],
     "avg_pred of class 'farm' is not a number"),
    (["Classes,avg_pred"] + [f"{c},{1.5 if c == 'farm' else 0.1}" for c in CLASSES],
     r"avg_pred of class 'farm' must lie in \[0, 1\]"),
    (["Classes,avg_pred"] + [f"{c},{'nan' if c == 'farm' else 0.1}" for c in CLASSES],
     "avg_pred of class 'farm' must lie in"),
    (["Classes,prior"] + [f"{c},0.1" for c in CLASSES], "no column avg_pred"),
    ([], "empty"),
])
def test_malformed_prior_csv_is_an_error_naming_the_file(tmp_path, lines, fragment):
    path = tmp_path / "bad_prior.csv"
    write_text(path, lines) if lines else path.write_text("")
    with pytest.raises(UserError, match=fragment) as err:
        read_prior_csv(path, CLASSES)
    assert "bad_prior.csv" in str(err.value)


def test_missing_prior_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.csv: prior file not found"):
        read_prior_csv(tmp_path / "nowhere.csv", CLASSES)


def test_csv_with_an_index_column_and_spaces_is_read_by_name(tmp_path):
    path = tmp_path / "prior.csv"
    write_text(path, [",Classes, avg_pred"] + [f"{i}, {c} ,{VALUES[c]}" for i, c in
                                                enumerate(reversed(CLASSES))])
    assert torch.equal(read_prior_csv(path, CLASSES),
                       torch.tensor([VALUES[c] for c in CLASSES]))


def test_label_prior_by_hand():
    targets = torch.tensor([[1, 0, -1, 1],
                            [1, -1, -1, 0],
                            [0, 1, -1, 0]])
    # class 0: 2 positives of 3 annotated; class 1: 1 of 2; class 2: none annotated -> 0;
    # class 3: 1 of 3
    expected = torch.tensor([2 / 3, 1 / 2, 0.0, 1 / 3])
    result = label_prior(targets)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(label_prior(targets.float().numpy()), expected)


def test_prior_has_effect_only_for_selective_partial_loss_with_unannotated_labels():
    partial = torch.tensor([[1, -1], [0, 1]])
    complete = torch.tensor([[1, 0], [0, 1]])
    assert prior_has_effect("PartialSelectiveLoss", {}, partial) is None
    assert prior_has_effect("pasl", {"partial_mode": None, "gamma_pos": 2}, partial) is None

    message = prior_has_effect("zlpr", {}, partial)
    assert "changes nothing" in message and "'zlpr'" in message

    message = prior_has_effect("pasl", {"partial_mode": "ignore"}, partial)
    assert "partial_mode is 'ignore'" in message and "selective" in message

    message = prior_has_effect("pasl", {}, complete)
    assert "no -1" in message

    assert "prior_threshold" in prior_has_effect("pasl", {"prior_threshold": 1.0}, partial)
