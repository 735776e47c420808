"""Flip TTA (de-flipped, unlike fastai's tta), folds, RLE and the atomic submission writer."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from fastunet.pipeline.splits import coverage_bins, make_folds, mask_coverage
from fastunet.learner.unet_learner import more_dynamic_unet_learner
from fastunet.learner.losses import LovaszHingeLoss
from fastunet.learner.metrics import tgs_scores
from fastunet.pipeline.submission import apply_threshold, rle_decode, rle_encode, search_threshold, write_submission
from fastunet.pipeline.tta import hflip_tta

from conftest import make_dls


class ColumnBiased(nn.Module):
    "Not flip-equivariant: logits = pixel value + a bias that grows from left to right."
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.))
    def forward(self, x): return (x[:, :1] - 0.5) * self.scale + torch.linspace(-3, 3, x.shape[-1], device=x.device)


def test_hflip_tta_deflips_the_mirror_and_fastai_tta_does_not(gray_dls):
    from fastai.vision.all import Flip, IntToFloatTensor
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, n_out=1, loss_func=LovaszHingeLoss())
    learn.model = ColumnBiased()
    x, _ = gray_dls.valid.one_batch()
    probs, targets = hflip_tta(learn)
    assert probs.shape == (len(gray_dls.valid_ds), 1, 101, 101) and targets.shape == (len(gray_dls.valid_ds), 101, 101)
    model = ColumnBiased()
    with torch.no_grad(): expected = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1)) / 2
    torch.testing.assert_close(probs[:len(x)], expected.cpu())
    # fastai's tta with a (certain) flip averages the mirror's prediction without flipping it back
    fastai_probs, _ = learn.tta(n=1, item_tfms=list(gray_dls.valid.after_item.fs), batch_tfms=[IntToFloatTensor(), Flip(p=1.)],
                                beta=0.5)
    assert not torch.allclose(fastai_probs, probs, atol=1e-2)


def test_hflip_tta_multiclass_probabilities_sum_to_one(data_factory):
    dls = make_dls(data_factory(3, 3, size=(48, 64), n_images=8), n_channels=3, n_classes=3)
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)
    probs, _ = hflip_tta(learn, progress=False)
    assert probs.shape[1:] == (3, 48, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))


def test_folds_are_seeded_balanced_and_stratified(data_factory):
    path = data_factory(1, 2, size=(32, 32), n_images=40)
    masks = sorted((path / 'masks').glob('*.png'))
    coverage = mask_coverage(masks)
    bins = coverage_bins(coverage, n_bins=3)
    folds = make_folds([m.name for m in masks], n_folds=4, seed=0, stratify=bins)
    assert isinstance(folds, pd.DataFrame) and set(folds.fold) == {0, 1, 2, 3}
    assert folds.fold.value_counts().max() - folds.fold.value_counts().min() <= 1
    for b in np.unique(bins):     # each coverage bin spread evenly over the folds
        counts = folds.fold[bins == b].value_counts().reindex(range(4), fill_value=0)
        assert counts.max() - counts.min() <= 1
    assert folds.equals(make_folds([m.name for m in masks], n_folds=4, seed=0, stratify=bins))
    assert not folds.equals(make_folds([m.name for m in masks], n_folds=4, seed=1, stratify=bins))
    with pytest.raises(ValueError, match='cannot make'):
        make_folds([1, 2], n_folds=3)


def test_rle_kaggle_convention():
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[1:, 0] = 1          # column 0, rows 1-2: pixels 2, 3
    mask[0, 1] = 1           # column 1, row 0: pixel 4
    assert rle_encode(mask) == '2 3'
    mask[:, 3] = 1           # the last column: pixels 10-12
    assert rle_encode(mask) == '2 3 10 3'
    assert rle_encode(np.ones((2, 2))) == '1 4' and rle_encode(np.zeros((2, 2))) == ''


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 1)))
def test_rle_round_trip(mask):
    assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


@pytest.mark.parametrize('fill', [0, 1])
def test_rle_round_trip_empty_and_full(fill):
    mask = np.full((101, 101), fill, dtype=np.uint8)
    assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


def test_rle_decode_rejects_runs_outside_the_image():
    with pytest.raises(ValueError, match='does not fit'):
        rle_decode('3 10', (3, 3))
    with pytest.raises(ValueError, match='start/length pairs'):
        rle_decode('1 2 3', (3, 3))


def test_threshold_and_min_area_search():
    truths = torch.zeros(4, 8, 8, dtype=torch.bool)
    truths[0, :4, :4] = True
    probs = torch.full((4, 8, 8), 0.1)
    probs[0, :4, :4] = 0.7                 # the object: found above 0.6 … 0.65
    probs[1, 0, :2] = 0.9                  # a 2-pixel false alarm on an empty image
    threshold, min_area, score = search_threshold(probs, truths, tgs_scores, min_areas=(0, 3))
    assert 0.1 < threshold < 0.7 and min_area == 3 and score == 1.0
    assert apply_threshold(probs, threshold, 0)[1].sum() == 2 and apply_threshold(probs, threshold, 3)[1].sum() == 0


def test_write_submission_is_atomic(tmp_path):
    path = write_submission([('a', '1 2'), ('b', '')], tmp_path / 'submission.csv')
    assert path.read_text().splitlines() == ['id,rle_mask', 'a,1 2', 'b,']
    def interrupted():
        yield ('c', '1 1')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_submission(interrupted(), path)
    assert path.read_text().splitlines() == ['id,rle_mask', 'a,1 2', 'b,']     # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ['submission.csv']            # no temporary file left behind
