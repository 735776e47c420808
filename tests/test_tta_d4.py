"""D4 and multi-scale TTA (issue 15, part 1): each transform exactly undone, the fold ensemble and tiled prediction
averaging the eight predictions of a model that is neither flip- nor rotation-equivariant, on non-square images."""
from __future__ import annotations

import pytest
import torch

from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.tiling import predict_tiled
from fastunet.pipeline.tta import D4_TRANSFORMS, apply_transform, invert_transform, transform_tta, tta_transforms
from fastunet.unet.model import MoreDynamicUnet


@pytest.mark.parametrize('shape', [(1, 1, 4, 4), (2, 3, 5, 9), (1, 2, 1, 7)])
def test_every_d4_element_round_trips_exactly(shape):
    x = torch.randn(shape)
    for name in D4_TRANSFORMS: assert torch.equal(invert_transform(apply_transform(x, name), name), x)
    images = {tuple(apply_transform(torch.arange(16.).view(1, 1, 4, 4), name).flatten().tolist()) for name in D4_TRANSFORMS}
    assert len(images) == 8                                                    # eight different elements


def test_the_ensemble_averages_the_eight_undone_predictions_of_a_model(tmp_path):
    torch.manual_seed(0)
    model = MoreDynamicUnet('resnet10t', n_out=2, n_in=1, pretrained=False).eval()   # random weights: no symmetry
    with torch.no_grad(): model.head.weight.mul_(300)                          # outputs far from uniform, so TTA shows
    ensemble = FoldEnsemble([model], dict(n_in=1, n_out=2, activation='softmax', normalize=None), device='cpu')
    x = torch.randint(0, 256, (2, 1, 48, 80), dtype=torch.uint8)              # not square: rotations change the shape
    with torch.no_grad():
        images = x.float() / 255
        expected = sum(invert_transform(torch.softmax(model(apply_transform(images, n)), 1), n) for n in D4_TRANSFORMS) / 8
        assert (torch.softmax(model(images), 1) - expected).abs().max() > 0.05   # TTA changes the prediction
    torch.testing.assert_close(ensemble.predict_batch(x, tta='d4'), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ensemble.predict_batch(x, tta=True), ensemble.predict_batch(x, tta='hflip'))
    image = x[0, 0].numpy()
    torch.testing.assert_close(predict_tiled(ensemble, image, tile=512, tta='d4'), expected[0], rtol=1e-4, atol=1e-4)


def test_bad_tta_names_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="tta must be one of"): tta_transforms('rotate')
    with pytest.raises(ValueError, match='must be among'): tta_transforms(['hflip', 'spin'])
    with pytest.raises(ValueError, match='must be among'): tta_transforms([])
    assert tta_transforms(True) == ('identity', 'hflip') and tta_transforms(False) == ('identity',)
    with pytest.raises(ValueError, match='positive factors'): transform_tta(torch.nn.Identity(), torch.zeros(1, 1, 4, 4), lambda t: t, scales=(-1,))


def test_multi_scale_tta_returns_the_input_size():
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(1, 1, 30, 50)
    out = transform_tta(model, x, torch.sigmoid, 'flips', scales=(0.5, 1.0, 1.5))
    assert out.shape == (1, 1, 30, 50) and torch.isfinite(out).all()


def test_learner_tta_with_d4_and_its_hflip_case(gray_dls):
    from fastunet.learner.unet_learner import more_dynamic_unet_learner
    from fastunet.pipeline.tta import hflip_tta, tta
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False)
    flipped, targets = hflip_tta(learn, progress=False)
    same, _ = tta(learn, transforms='hflip', progress=False)
    assert torch.equal(flipped, same) and targets is not None
    d4, _ = tta(learn, transforms='d4', scales=(1.0, 0.5), merge='gmean', progress=False)
    assert d4.shape == flipped.shape
    torch.testing.assert_close(d4.sum(1), torch.ones_like(d4[:, 0]), rtol=0, atol=1e-5)   # gmean renormalised over classes
    with pytest.raises(ValueError, match='tta must be one of'): tta(learn, transforms='spin')


def test_the_ensemble_predicts_at_several_scales_and_sizes_them_back():
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = MoreDynamicUnet('resnet10t', n_out=2, n_in=1, pretrained=False).eval()
    with torch.no_grad(): model.head.weight.mul_(300)
    record = dict(n_in=1, n_out=2, activation='softmax', normalize=None)
    ensemble = FoldEnsemble([model], record, device='cpu', tta_scales=(0.5, 1.0))
    x = torch.randint(0, 256, (2, 1, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        images, terms = x.float() / 255, []
        for scale in (0.5, 1.0):
            scaled = F.interpolate(images, scale_factor=scale, mode='bilinear', align_corners=False) if scale != 1 else images
            p = (torch.softmax(model(scaled), 1) + torch.softmax(model(scaled.flip(-1)), 1).flip(-1)) / 2
            terms.append(F.interpolate(p, size=(64, 96), mode='bilinear', align_corners=False) if scale != 1 else p)
    torch.testing.assert_close(ensemble.predict_batch(x), sum(terms) / 2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='positive factors'): FoldEnsemble([model], record, device='cpu', tta_scales=(0,))
