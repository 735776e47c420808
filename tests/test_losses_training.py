"""Each loss trains a learner on generated data (its IoU improves), and get_preds / predict decode through it."""
from __future__ import annotations

import pytest
import torch
from fastai.vision.all import set_seed

from fastunet.learner.unet_learner import more_dynamic_unet_learner
from fastunet.learner.losses import BCELovaszLoss, CELovaszLoss, LovaszHingeLoss, LovaszSoftmaxLoss, SymmetricLovaszLoss
from fastunet.learner.metrics import BinaryIoU

from conftest import make_dls

LOSSES = {'lovasz_hinge': (LovaszHingeLoss, 1), 'symmetric_lovasz': (SymmetricLovaszLoss, 1), 'bce_lovasz': (BCELovaszLoss, 1),
          'lovasz_softmax': (LovaszSoftmaxLoss, 2), 'ce_lovasz': (CELovaszLoss, 2)}


@pytest.fixture(scope='module')
def salt_dls(data_factory):
    return make_dls(data_factory(1, 2, size=(64, 64), n_images=80), bs=4)


@pytest.mark.parametrize('name', LOSSES)
@pytest.mark.slow
def test_each_loss_trains(salt_dls, name):
    loss_cls, n_out = LOSSES[name]
    set_seed(0, reproducible=True)
    learn = more_dynamic_unet_learner(salt_dls, 'test_resnet', pretrained=False, n_out=n_out, loss_func=loss_cls(),
                                      metrics=BinaryIoU())
    _, iou_before = learn.validate()
    learn.fit_one_cycle(5, 3e-3)      # 80 steps: BatchNorm's running statistics need a few dozen to settle
    _, iou_after = learn.validate()
    assert iou_after > iou_before + 0.1, f'{name}: IoU {iou_before:.3f} → {iou_after:.3f}'


@pytest.mark.parametrize('name', LOSSES)
def test_get_preds_gives_probabilities_and_predict_a_mask(salt_dls, name):
    loss_cls, n_out = LOSSES[name]
    learn = more_dynamic_unet_learner(salt_dls, 'test_resnet', pretrained=False, n_out=n_out, loss_func=loss_cls())
    probs, targets = learn.get_preds()
    assert probs.shape == (len(salt_dls.valid_ds), n_out, 64, 64)
    assert probs.min() >= 0 and probs.max() <= 1
    if n_out > 1: torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))
    mask, decoded, item_probs = learn.predict(salt_dls.valid_ds.items[0])
    assert mask.shape == (64, 64) and set(mask.unique().tolist()) <= {0, 1}
    assert item_probs.shape == (n_out, 64, 64)
