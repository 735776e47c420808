"""Metrics by hand-computed cases, and accumulation over batches equal to one pass over the whole set."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastunet.learner.metrics import BinaryDice, BinaryIoU, MultiDice, MultiIoU, TGSMetric, foreground_mask, tgs_scores


def run_metric(metric, batches):
    metric.reset()
    for pred, y in batches: metric.accumulate(SimpleNamespace(pred=pred, y=y))
    return metric.value


def mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == '#' for c in row] for row in rows])


def test_tgs_hand_computed():
    truth = torch.stack([mask(['##..', '##..']), mask(['....', '....']), mask(['....', '....']), mask(['####', '....']),
                         mask(['####', '####'])])
    pred = torch.stack([mask(['##..', '##..']),    # perfect: 1
                        mask(['....', '....']),    # empty vs empty: 1
                        mask(['#...', '....']),    # anything on an empty truth: 0
                        mask(['....', '....']),    # nothing where there is salt: 0
                        mask(['####', '###.'])])   # IoU 7/8 = 0.875: beats 0.5 … 0.85 (8 of 10): 0.8
    torch.testing.assert_close(tgs_scores(pred, truth), torch.tensor([1., 1., 0., 0., 0.8]))


def test_tgs_iou_on_a_threshold_does_not_count():
    "IoU exactly 0.5 is not above the 0.5 threshold."
    truth, pred = mask(['##..']), mask(['#...'])
    assert tgs_scores(pred[None], truth[None]).item() == 0.


def logits_from(masks: torch.Tensor) -> torch.Tensor:
    return torch.where(masks, 10., -10.)[:, None]


def test_tgs_metric_averages_images_not_batches():
    truth = torch.stack([mask(['##', '..']), mask(['..', '..']), mask(['..', '..'])])
    pred = torch.stack([mask(['##', '..']), mask(['#.', '..']), mask(['..', '..'])])    # scores 1, 0, 1
    batches = [(logits_from(pred[:2]), truth[:2].long()), (logits_from(pred[2:]), truth[2:].long())]
    assert run_metric(TGSMetric(), batches) == pytest.approx(2 / 3)   # a mean of batch means would give (0.5 + 1) / 2


def test_dice_and_iou_hand_computed_over_batches():
    truth = torch.stack([mask(['###.']), mask(['....']), mask(['##..'])])
    pred = torch.stack([mask(['##..']), mask(['#...']), mask(['##..'])])
    # shared pixels 2 + 0 + 2 = 4; predicted 2 + 1 + 2 = 5; true 3 + 0 + 2 = 5; union 5 + 5 - 4 = 6
    batches = [(logits_from(pred[:1]), truth[:1].long()), (logits_from(pred[1:]), truth[1:].long())]
    assert run_metric(BinaryDice(), batches) == pytest.approx(8 / 10)
    assert run_metric(BinaryIoU(), batches) == pytest.approx(4 / 6)


def test_empty_everywhere_scores_one():
    "A fold without foreground, predicted empty: Dice and IoU 1 (issue 26: None stopped training with a TypeError)."
    empty = torch.zeros(2, 1, 4, dtype=torch.bool)
    assert run_metric(BinaryDice(), [(logits_from(empty[:, 0]), empty[:, 0].long())]) == 1.
    assert run_metric(BinaryIoU(), [(logits_from(empty[:, 0]), empty[:, 0].long())]) == 1.


def test_threshold_and_class_scores():
    logits = torch.tensor([[[[-0.1, 0.1, 2.0]]]])                 # sigmoid: 0.475, 0.525, 0.88
    assert foreground_mask(logits).tolist() == [[[False, True, True]]]
    assert foreground_mask(logits, threshold=0.8).tolist() == [[[False, False, True]]]
    scores = torch.tensor([[[[2., 0.]], [[1., 3.]], [[0., 1.]]]])   # (1, 3 classes, 1, 2): argmax 0, 1
    assert foreground_mask(scores).tolist() == [[[False, True]]]


def test_multiclass_dice_and_iou_hand_computed_over_batches():
    "MultiDice / MultiIoU (fastai's DiceMulti / JaccardCoeffMulti) score each class over the whole set, then average."
    truth = torch.tensor([[[0, 1, 1, 2]], [[2, 2, 0, 0]]])                  # (2 images, 1 row, 4 pixels)
    pred = torch.tensor([[[0, 1, 2, 2]], [[2, 0, 0, 1]]])
    scores = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()   # class scores whose argmax is `pred`
    batches = [(scores[:1], truth[:1]), (scores[1:], truth[1:])]
    # class 0: |p∩t| 2, |p| 3, |t| 3;  class 1: 1, 2, 2;  class 2: 2, 3, 3
    dice = [2 * 2 / 6, 2 * 1 / 4, 2 * 2 / 6]
    iou = [2 / 4, 1 / 3, 2 / 4]
    assert run_metric(MultiDice(), batches) == pytest.approx(sum(dice) / 3)
    assert run_metric(MultiIoU(), batches) == pytest.approx(sum(iou) / 3)
