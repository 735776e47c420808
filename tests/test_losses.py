"""Lovász losses against a slow, obviously-correct reference written from the paper's definitions (Berman et al.
2018): sort the errors, take the Jaccard loss of each prefix of the sorted pixels as a set, difference it, dot it
with the errors. Values and gradients must agree to float precision; edge cases stay finite."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastunet.learner.losses import (BCELovaszLoss, CELovaszLoss, LovaszHingeLoss, LovaszSoftmaxLoss, SymmetricLovaszLoss,
                             lovasz_hinge, lovasz_softmax, symmetric_lovasz)


def jaccard_loss_weights(foreground_sorted: list[bool]) -> torch.Tensor:
    "Δ_J(first k pixels) − Δ_J(first k−1), with Δ_J(M) = |M| / |truth ∪ M| computed on Python sets."
    truth = {i for i, f in enumerate(foreground_sorted) if f}
    previous, weights = 0., []
    for k in range(1, len(foreground_sorted) + 1):
        mistakes = set(range(k))
        current = len(mistakes) / len(truth | mistakes)
        weights.append(current - previous)
        previous = current
    return torch.tensor(weights, dtype=torch.float64)


def reference_hinge_image(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    "Lovász hinge of one image, from 1-D logits and 0/1 labels (already without ignored pixels)."
    if len(labels) == 0: return logits.sum() * 0
    errors = 1 - logits * (2 * labels.double() - 1)
    errors_sorted, order = torch.sort(errors, descending=True)
    weights = jaccard_loss_weights([bool(labels[i]) for i in order])
    return torch.dot(F.relu(errors_sorted), weights)


def reference_hinge(logits, labels, per_image=True, ignore=None):
    logits, labels = logits.double(), labels
    images = zip(logits, labels) if per_image else [(logits, labels)]
    losses = []
    for image_logits, image_labels in images:
        keep = torch.ones_like(image_labels, dtype=torch.bool) if ignore is None else image_labels != ignore
        losses.append(reference_hinge_image(image_logits[keep], image_labels[keep]))
    return torch.stack(losses).mean()


def reference_softmax(probas, labels, classes='present', per_image=False, ignore=None):
    probas = probas.double()
    pairs = zip(probas, labels) if per_image else [(probas.permute(1, 0, 2, 3).reshape(probas.shape[1], -1), labels.reshape(-1))]
    losses = []
    for image_probas, image_labels in pairs:
        image_probas, image_labels = image_probas.reshape(len(image_probas), -1), image_labels.reshape(-1)
        keep = torch.ones_like(image_labels, dtype=torch.bool) if ignore is None else image_labels != ignore
        image_probas, image_labels = image_probas[:, keep], image_labels[keep]
        class_losses = []
        for c in range(len(image_probas)):
            foreground = image_labels == c
            if classes == 'present' and not foreground.any(): continue
            errors = (foreground.double() - image_probas[c]).abs()
            errors_sorted, order = torch.sort(errors, descending=True)
            class_losses.append(torch.dot(errors_sorted, jaccard_loss_weights([bool(foreground[i]) for i in order])))
        losses.append(torch.stack(class_losses).mean() if class_losses else probas.sum() * 0)
    return torch.stack(losses).mean()


def assert_same_value_and_gradient(ours_fn, reference_fn, x):
    x_ours = x.clone().requires_grad_()
    x_ref = x.clone().double().requires_grad_()
    ours, reference = ours_fn(x_ours), reference_fn(x_ref)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    ours.backward(); reference.backward()
    torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-6)


def random_binary_case(seed, batch=3, size=6, ignore=None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, size, size, generator=generator) * 2
    labels = torch.randint(0, 2, (batch, size, size), generator=generator)
    labels[0] = 0                       # an empty mask
    labels[1] = 1                       # a full mask
    if ignore is not None: labels[torch.rand(labels.shape, generator=generator) < 0.2] = ignore
    return logits, labels


@pytest.mark.parametrize('per_image', [True, False])
@pytest.mark.parametrize('ignore', [None, 255])
@pytest.mark.parametrize('seed', range(3))
def test_hinge_matches_reference(seed, per_image, ignore):
    logits, labels = random_binary_case(seed, ignore=ignore)
    assert_same_value_and_gradient(lambda x: lovasz_hinge(x, labels, per_image, ignore),
                                   lambda x: reference_hinge(x, labels, per_image, ignore), logits)


@pytest.mark.parametrize('per_image', [True, False])
def test_symmetric_matches_its_definition(per_image):
    logits, labels = random_binary_case(7)
    def reference(x): return (reference_hinge(x, labels, per_image) + reference_hinge(-x, 1 - labels, per_image)) / 2
    assert_same_value_and_gradient(lambda x: symmetric_lovasz(x, labels, per_image), reference, logits)


@pytest.mark.parametrize('per_image', [True, False])
@pytest.mark.parametrize('classes', ['present', 'all'])
@pytest.mark.parametrize('ignore', [None, 255])
def test_softmax_matches_reference(per_image, classes, ignore):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, 5, generator=generator)
    labels = torch.randint(0, 3, (3, 5, 5), generator=generator)     # class 3 never present
    labels[0] = 1
    if ignore is not None: labels[torch.rand(labels.shape, generator=generator) < 0.2] = ignore
    assert_same_value_and_gradient(lambda x: lovasz_softmax(F.softmax(x, 1), labels, classes, per_image, ignore),
                                   lambda x: reference_softmax(F.softmax(x, 1), labels, classes, per_image, ignore), logits)


def test_softmax_class_list():
    probas = F.softmax(torch.randn(2, 3, 4, 4), 1)
    labels = torch.randint(0, 3, (2, 4, 4))
    only_one = lovasz_softmax(probas, labels, classes=[1])
    torch.testing.assert_close(only_one, lovasz_hinge_free_class_loss(probas, labels, 1))


def lovasz_hinge_free_class_loss(probas, labels, c):
    errors = ((labels == c).double() - probas[:, c].double()).abs().reshape(-1)
    errors_sorted, order = torch.sort(errors, descending=True)
    return torch.dot(errors_sorted, jaccard_loss_weights([bool((labels == c).reshape(-1)[i]) for i in order])).float()


EDGE_CASES = {
    'empty': torch.zeros(2, 8, 8, dtype=torch.long),
    'full': torch.ones(2, 8, 8, dtype=torch.long),
    'all_ignored': torch.full((2, 8, 8), 255),
    'batch_of_one': torch.randint(0, 2, (1, 8, 8)),
}


@pytest.mark.parametrize('case', EDGE_CASES, ids=EDGE_CASES.keys())
@pytest.mark.parametrize('loss', [LovaszHingeLoss(ignore=255), SymmetricLovaszLoss(ignore=255), BCELovaszLoss(ignore=255),
                                  LovaszHingeLoss(per_image=False, ignore=255)], ids=['hinge', 'symmetric', 'bce_lovasz', 'hinge_batch'])
def test_binary_losses_stay_finite(case, loss):
    labels = EDGE_CASES[case]
    for logits in (torch.randn(len(labels), 1, 8, 8), torch.full((len(labels), 1, 8, 8), 30.), torch.zeros(len(labels), 1, 8, 8)):
        logits.requires_grad_()
        value = loss(logits, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize('case', EDGE_CASES, ids=EDGE_CASES.keys())
@pytest.mark.parametrize('loss', [LovaszSoftmaxLoss(ignore=255), LovaszSoftmaxLoss(per_image=True, ignore=255), CELovaszLoss(ignore=255)],
                         ids=['softmax', 'softmax_per_image', 'ce_lovasz'])
def test_multiclass_losses_stay_finite(case, loss):
    labels = EDGE_CASES[case]
    logits = torch.randn(len(labels), 3, 8, 8, requires_grad=True)
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    "Under autocast (and with half inputs) the sort and sums run in float32: finite values and gradients that match."
    logits, labels = random_binary_case(11, batch=4, size=16)
    expected = lovasz_hinge(logits, labels)
    half = logits.to(dtype).requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value = symmetric_lovasz(half, labels) + lovasz_hinge(half, labels)
        softmax = LovaszSoftmaxLoss()(torch.randn(2, 3, 8, 8, dtype=dtype), torch.randint(0, 3, (2, 8, 8)))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(softmax)
    assert torch.isfinite(half.grad.float()).all() and half.grad.abs().sum() > 0
    torch.testing.assert_close(lovasz_hinge(logits.to(dtype), labels), expected, rtol=2e-2, atol=2e-2)


def test_large_logits_do_not_overflow():
    logits, labels = random_binary_case(5, size=32)
    value = lovasz_hinge((logits * 1e3).half(), labels)     # |logits| up to ~8000: near float16 limits, summed in float32
    assert torch.isfinite(value)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match='must have the same shape'):
        lovasz_hinge(torch.zeros(2, 8, 8), torch.zeros(2, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r'binary targets must be 0 or 1; found \[255\].*0/255'):
        LovaszHingeLoss()(torch.zeros(2, 1, 4, 4), torch.full((2, 4, 4), 255))
    with pytest.raises(ValueError, match='binary targets must be 0 or 1'):
        BCELovaszLoss()(torch.zeros(2, 1, 4, 4), torch.full((2, 4, 4), 2))
    with pytest.raises(ValueError, match=r'labels must be class codes 0..2'):
        LovaszSoftmaxLoss()(torch.zeros(2, 3, 4, 4), torch.full((2, 4, 4), 3))
    with pytest.raises(ValueError, match=r'needs probabilities \(B, C, H, W\)'):
        lovasz_softmax(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long))


def test_fastai_tensor_types_are_accepted():
    from fastai.torch_core import TensorImage, TensorMask
    labels = TensorMask(torch.randint(0, 2, (2, 8, 8)))
    logits = TensorImage(torch.randn(2, 1, 8, 8))
    assert torch.isfinite(SymmetricLovaszLoss()(logits, labels))
    assert torch.isfinite(CELovaszLoss()(TensorImage(torch.randn(2, 2, 8, 8)), labels))
