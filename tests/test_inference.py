"""The fast prediction path: batch norm folded (same outputs, weights on disk untouched), channels-last by device,
the fold ensemble's background image readers, autocast and compile options, and the learner's memory format."""
from __future__ import annotations

import copy
import hashlib
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from PIL import Image

from fastunet.learner.data import image_tensor
from fastunet.learner.unet_learner import more_dynamic_unet_learner
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.inference import conv_batchnorm_pairs, fold_batchnorm, inference_model
from fastunet.pipeline.records import fold_paths
from fastunet.pipeline.splits import make_folds
from fastunet.pipeline.training import train_folds
from fastunet.pipeline.tta import hflip_tta
from fastunet.pipeline.data_folder import segmentation_block
from fastunet.unet.memory_format import is_channels_last
from fastunet.unet.model import MoreDynamicUnet

from conftest import make_dls


def trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    "Give every batch norm statistics and affine parameters far from the identity, as training does."
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 3 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=generator) * 1.5 + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=generator) * 2 - 1)
    return model.eval()


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize('arch, options', [
    ('resnet10t', {}),                                             # timm, plain BatchNorm2d
    (tvm.resnet18, {}),                                            # torchvision, traced into an FX graph
    ('test_efficientnet', {}),                                     # timm's BatchNormAct2d (norm + activation in one module)
    ('test_convnext', {}),                                         # layer norm in the encoder: only the decoder's norms fold
    ('resnet10t', dict(attention='scse', hypercolumns=True)),
    ('resnet10t', dict(config='blog')),                            # self-attention, blur, last cross, residual head
    ('resnet10t', dict(upsample='transposed', middle_attention=True)),
    ('resnet10t', dict(norm='weight')),                            # weight-normalised convolutions: not folded, still equal
    ('unet', dict(config='paper')),
])
def test_folded_model_predicts_what_the_trained_one_does(arch, options):
    torch.manual_seed(0)
    model = trained_statistics(MoreDynamicUnet(arch, n_out=2, **options))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 72, 100)                                # not a multiple of the size divisor: padded inside
    with torch.no_grad(): expected = model(x)
    ready = inference_model(model)
    out = ready(x)
    assert ready.n_folded > 0
    assert batch_norms(ready.model) == batch_norms(model) - ready.n_folded
    assert (out - expected).abs().max() <= 1e-4 * max(1., expected.abs().max().item())
    assert is_channels_last(ready.model) and out.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())    # the trained model is untouched
    assert not model.training


def test_every_norm_after_a_convolution_folds_in_a_resnet_unet():
    model = trained_statistics(MoreDynamicUnet('resnet10t', n_out=1))
    folded, n = fold_batchnorm(model, torch.randn(1, 3, 64, 64))
    assert n == batch_norms(model) and batch_norms(folded) == 0


def test_a_norm_that_does_not_follow_a_convolution_or_shares_its_input_is_not_folded():
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.after_pool, self.residual = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        def forward(self, x):
            y = self.conv(x)
            z = self.after_pool(nn.functional.max_pool2d(y, 2))     # norm after a pool, not after the convolution
            w = self.conv2(z)
            return self.bn2(w) + w.mean()                          # the convolution's output read twice
    model = trained_statistics(Shapes())
    x = torch.randn(2, 3, 16, 16)
    assert conv_batchnorm_pairs(model, x[:1]) == []
    folded, n = fold_batchnorm(model, x[:1])
    assert n == 0
    with torch.no_grad(): torch.testing.assert_close(folded(x), model(x))


def test_a_fold_that_would_change_the_outputs_is_abandoned_with_a_warning(monkeypatch):
    "The check after folding is the safety net: a wrong fold costs speed, never accuracy."
    import fastunet.pipeline.inference as inference
    model = trained_statistics(MoreDynamicUnet('resnet10t', n_out=1))
    def wrong_fold(conv, norm): conv.weight.data.mul_(2)
    monkeypatch.setattr(inference, '_fold_into', wrong_fold)
    with pytest.warns(UserWarning, match='used unfolded'):
        folded, n = fold_batchnorm(model, torch.randn(1, 3, 64, 64))
    assert n == 0 and batch_norms(folded) == batch_norms(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(folded(x), model(x))


def test_other_models_need_an_example_to_fold():
    import segmentation_models_pytorch as smp
    model = trained_statistics(smp.Unet('resnet18', encoder_weights=None, classes=1))
    with pytest.raises(ValueError, match='example='): inference_model(model)
    x = torch.randn(2, 3, 64, 64)
    ready = inference_model(model, example=x[:1])
    assert ready.n_folded == batch_norms(model)
    with torch.no_grad(): expected = model(x)
    assert (ready(x) - expected).abs().max() <= 1e-4 * max(1., expected.abs().max().item())


def test_autocast_is_off_on_cpu_unless_a_dtype_is_asked_for():
    model = trained_statistics(MoreDynamicUnet('resnet10t', n_out=1))
    assert inference_model(model).autocast_dtype is None
    bf16 = inference_model(model, autocast=torch.bfloat16)
    x = torch.randn(2, 3, 64, 64)
    out = bf16(x)
    with torch.no_grad(): expected = model(x)
    assert out.dtype == torch.float32 and not torch.equal(out, inference_model(model)(x))     # computed in bfloat16
    torch.testing.assert_close(out, expected, atol=0.1 * expected.abs().max().item(), rtol=0.1)
    assert inference_model(model, autocast=False, channels_last=False).autocast_dtype is None
    assert not is_channels_last(inference_model(model, channels_last=False).model)


def test_learner_trains_channels_last_on_cpu_and_the_option_turns_it_off(data_factory):
    learn = more_dynamic_unet_learner(make_dls(data_factory(1, 2)), 'resnet10t', pretrained=False)
    assert is_channels_last(learn.model)
    learn.fit(1, 1e-3)                                           # a batch in NCHW: converted by the first convolution
    assert is_channels_last(learn.model)                         # and the weights stay so through the optimiser's steps
    plain = more_dynamic_unet_learner(make_dls(data_factory(1, 2)), 'resnet10t', pretrained=False, channels_last=False)
    assert not is_channels_last(plain.model)


@pytest.mark.parametrize('options', [{}, dict(config='blog'), dict(attention='scse', hypercolumns=True), dict(upsample='bilinear')])
def test_channels_last_gives_the_outputs_and_gradients_of_nchw(options):
    "Against a float64 reference: a wrong layout anywhere would be off by O(1), not by float rounding."
    threads = torch.get_num_threads()
    torch.set_num_threads(2)         # the rounding measured below is oneDNN's with two threads (one thread's kernels round more)
    try: _compare_layouts_with_float64(options)
    finally: torch.set_num_threads(threads)


def _compare_layouts_with_float64(options: dict) -> None:
    torch.manual_seed(0)
    model = MoreDynamicUnet('resnet10t', n_out=2, **options)
    x, y = torch.randn(4, 3, 96, 128), torch.randint(0, 2, (4, 96, 128))
    def loss_and_gradient(m, x):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()]).double()
    reference_loss, reference = loss_and_gradient(copy.deepcopy(model).double(), x.double())
    for memory_format in (torch.contiguous_format, torch.channels_last):
        loss, gradient = loss_and_gradient(copy.deepcopy(model).to(memory_format=memory_format), x)
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        # oneDNN's channels-last kernels round more than its NCHW ones (0.3% vs 0.015% of the gradient's norm here)
        assert (gradient - reference).norm() <= 1e-2 * reference.norm()


def test_hflip_tta_predicts_through_a_prepared_copy_and_leaves_the_learner_as_it_was(data_factory):
    dls = make_dls(data_factory(1, 2))
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)
    trained_statistics(learn.model).train()
    probs, targets = hflip_tta(learn, dls.valid, progress=False)
    assert learn.model.training and batch_norms(learn.model) > 0
    learn.model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in dls.valid])
        expected = (torch.softmax(learn.model(x), 1) + torch.softmax(learn.model(x.flip(-1)), 1).flip(-1)) / 2
    torch.testing.assert_close(probs, expected.as_subclass(torch.Tensor), rtol=1e-4, atol=1e-4)
    assert targets.shape[0] == probs.shape[0]


@pytest.fixture(scope='module')
def one_fold(data_factory, tmp_path_factory):
    data = data_factory(1, 2, size=(64, 64), n_images=12)
    df = make_folds([str(p) for p in sorted((data / 'images').glob('*.png'))], n_folds=2, seed=0)
    out = tmp_path_factory.mktemp('one_fold')
    train_folds(segmentation_block(1), df, 'resnet10t', out, epochs=1, bs=4, folds=[0], dls_kwargs=dict(num_workers=0),
                learner_kwargs=dict(pretrained=False))
    return out, sorted((data / 'images').glob('*.png'))


def test_ensemble_leaves_fold_files_unchanged_and_predicts_what_the_fold_model_does(one_fold):
    out, images = one_fold
    files = [fold_paths(out, 0)['weights'], out / 'fold_0.json']
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    ensemble = FoldEnsemble.from_dir(out, device='cpu', folds=[0])
    probs = ensemble.predict(images, bs=5, progress=False)
    record = json.loads((out / 'fold_0.json').read_text())
    trained = MoreDynamicUnet(record['arch'], n_out=record['n_out'], n_in=record['n_in'], config=record['config']).eval()
    from fastunet.pipeline.fold_weights import read_fold_weights      # a fold's weights, with their identity
    state = read_fold_weights(files[0])[0]
    assert all(v.is_contiguous() for v in state.values())                  # saved NCHW, though it trained channels-last
    trained.load_state_dict(state)
    assert ensemble.models[0].n_folded == batch_norms(trained) > 0 and batch_norms(ensemble.models[0]) == 0
    x = torch.stack([image_tensor(p, 1) for p in images])
    mean, std = record['normalize'] or ([0.], [1.])
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad(): expected = (torch.softmax(trained(x), 1) + torch.softmax(trained(x.flip(-1)), 1).flip(-1)) / 2
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-4)
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == digests


def test_background_readers_give_the_same_predictions_in_the_same_order(one_fold):
    out, images = one_fold
    ensemble = FoldEnsemble.from_dir(out, device='cpu', folds=[0])
    in_process = list(ensemble.predict_iter(images, bs=4, progress=False, num_workers=0))
    with_readers = list(ensemble.predict_iter(images, bs=4, progress=False, num_workers=2))
    assert [item for item, _ in with_readers] == images
    for (_, a), (_, b) in zip(in_process, with_readers): assert torch.equal(a, b)
    series = pd.Series(images, index=range(100, 100 + len(images)))       # a DataFrame's column: read by position, not label
    assert [item for item, _ in ensemble.predict_iter(series, bs=4, progress=False, num_workers=2)] == images


def test_an_unreadable_image_read_by_a_worker_is_named_without_a_worker_traceback(one_fold, tmp_path):
    out, images = one_fold
    broken = tmp_path / 'broken.png'
    broken.write_text('not an image')
    ensemble = FoldEnsemble.from_dir(out, device='cpu', folds=[0])
    with pytest.raises(ValueError) as raised:
        list(ensemble.predict_iter([*images[:3], broken, *images[3:5]], bs=2, progress=False, num_workers=2))
    assert "broken.png' cannot be read as an image" in str(raised.value) and 'Traceback' not in str(raised.value)


def test_images_already_in_memory_are_read_in_process_and_odd_dtypes_refused(one_fold):
    out, images = one_fold
    ensemble = FoldEnsemble.from_dir(out, device='cpu', folds=[0])
    arrays = [np.array(Image.open(p)) for p in images[:4]]
    torch.testing.assert_close(ensemble.predict(arrays, bs=2, progress=False, num_workers=2),
                               ensemble.predict(images[:4], bs=2, progress=False, num_workers=0))
    batch = torch.stack([torch.from_numpy(a)[None] for a in arrays])
    torch.testing.assert_close(ensemble.predict_batch(batch), ensemble.predict_batch(batch.float() / 255))
    with pytest.raises(ValueError, match='uint8'): ensemble.predict_batch(batch.long())


def test_prepared_model_returns_ordinary_tensors_and_unwraps_wrappers():
    model = trained_statistics(MoreDynamicUnet('resnet10t', n_out=1))
    out = inference_model(nn.DataParallel(model))(torch.randn(1, 3, 64, 64))
    out[out < 0] = 0                                                       # an inference tensor would refuse this
    twice = inference_model(inference_model(model))                       # a prepared model prepared again: nothing left to fold
    assert twice.n_folded == 0 and batch_norms(twice.model) == 0


@pytest.mark.slow
def test_compiled_ensemble_predicts_what_the_plain_one_does(one_fold):
    out, images = one_fold
    plain = FoldEnsemble.from_dir(out, device='cpu', folds=[0]).predict(images[:4], bs=4, progress=False, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        compiled = FoldEnsemble.from_dir(out, device='cpu', folds=[0], compile=True)
        probs = compiled.predict(images[:4], bs=4, progress=False, num_workers=0)
    torch.testing.assert_close(probs, plain, rtol=1e-4, atol=1e-4)
