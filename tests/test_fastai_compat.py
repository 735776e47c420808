"""Switching from fastai's `unet_learner` is one word: the cases of fastai's own U-Net tests (its `vision.models.unet`
and `vision.learner` notebooks) run against `more_dynamic_unet_learner`, with fastai's keywords; the fastai tools a
segmentation user reaches for (lr_find, show_results, plot_top_losses, to_channelslast); image-to-image models; and
the from-scratch 'unet' encoder through k-fold training, fold records and the ensemble."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
from fastai.vision.all import (BCEWithLogitsLossFlat, ColReader, DataBlock, ImageBlock, MaskBlock, Mish, NormType, PILImage,
                               PILImageBW, Pipeline, RandomSplitter, SegmentationInterpretation, get_image_files, load_learner)
from torchvision.models import resnet18

from fastunet.learner.data import MaskFromFolder
from fastunet.learner.metrics import PSNR
from fastunet.learner.unet_learner import more_dynamic_unet_learner
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.records import fold_paths
from fastunet.pipeline.splits import make_folds
from fastunet.pipeline.training import train_folds
from fastunet.unet.config import UnetConfig
from fastunet.unet.layers import WeightNormConv2d
from fastunet.unet.model import MoreDynamicUnet

from conftest import make_dls

# every keyword fastai's `unet_learner` passes on to its `DynamicUnet`, with a value other than its default
FASTAI_KEYWORDS = [dict(blur=True), dict(blur=True, blur_final=False), dict(self_attention=True), dict(y_range=(-3, 3)),
                   dict(last_cross=True), dict(last_cross=True, bottle=True), dict(act_cls=Mish),
                   dict(init=nn.init.kaiming_normal_), dict(norm_type=NormType.Weight), dict(norm_type=NormType.Spectral),
                   dict(norm_type=None)]


# ---- fastai's vision.models.unet cases: shapes, odd sizes, norm_type=None, on a torchvision callable
@pytest.mark.parametrize('size', [(128, 128), (127, 128), (101, 77)])
def test_dynamic_unet_shapes_as_in_fastai(size):
    model = MoreDynamicUnet(resnet18, n_out=5, norm_type=None)
    assert model(torch.randn(2, 3, *size)).shape == (2, 5, *size)


# ---- fastai's vision.learner cases, keyword by keyword: accepted, meaning what fastai means, trained one step
@pytest.mark.parametrize('keywords', FASTAI_KEYWORDS, ids=lambda k: ','.join(f'{n}={getattr(v, "__name__", v)}' for n, v in k.items()))
def test_unet_learner_keywords_are_accepted_and_train(gray_dls, keywords):
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, **keywords)
    x, y = gray_dls.one_batch()
    out = learn.model(x)
    assert out.shape == (len(x), 2, *x.shape[-2:])
    learn.loss_func(out, y).backward()
    assert all(p.grad is not None for p in learn.model.parameters() if p.requires_grad)
    config = learn.model.config
    assert UnetConfig(**json.loads(json.dumps(config.as_dict()))) == config      # the record holds plain values


def test_fastai_keywords_mean_what_they_mean_in_fastai(gray_dls):
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, blur=True, blur_final=False, self_attention=True,
                                      y_range=(-3, 3), last_cross=True, bottle=True, act_cls=Mish, norm_type=NormType.Weight,
                                      init=nn.init.kaiming_normal_)
    model = learn.model
    stages_with_attention = [s.reduction for s, b in zip(model.stages, model.blocks) if type(b.attention).__name__ == 'SelfAttention']
    assert stages_with_attention == [8]                                       # one self-attention layer, at stride 8
    blurred = [not isinstance(b.upsample.blur, nn.Identity) for b in model.blocks]
    joins_skip = [s.skip_index is not None for s in model.stages]
    last_join = max(i for i, joins in enumerate(joins_skip) if joins)
    assert blurred == [joins and i != last_join for i, joins in enumerate(joins_skip)]   # fastai's UnetBlocks but the last
    assert blurred.count(True) == 3
    with torch.no_grad(): out = model(gray_dls.one_batch()[0] * 50)        # large inputs: outputs still within y_range
    assert -3 <= out.min() and out.max() <= 3 and out.max() - out.min() > 1      # sigmoid saturates at the bounds
    assert model.residual.convs[0][0].out_channels == model.residual.convs[0][0].in_channels // 2   # bottle
    assert model.residual.convs[0][0].in_channels == model.blocks[-1].convs[-1][0].out_channels + 1  # last_cross: + the input
    assert any(isinstance(m, nn.Mish) for m in model.blocks.modules())
    assert all(isinstance(m, WeightNormConv2d) for b in model.blocks for m in b.convs.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(model.head, WeightNormConv2d)                          # fastai's head is a ConvLayer with norm_type too


def decoder_conv_std(model) -> float:
    return torch.cat([m.weight.detach().flatten() for m in model.blocks.modules() if isinstance(m, nn.Conv2d)]).std().item()


def test_init_reinitialises_the_decoder_and_leaves_the_encoder(gray_dls):
    torch.manual_seed(0)
    plain = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False).model
    torch.manual_seed(0)
    kaiming = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, init=nn.init.kaiming_normal_).model
    assert decoder_conv_std(kaiming) > 2 * decoder_conv_std(plain)          # kaiming_normal: √6 times PyTorch's default spread
    for (name, a), b in zip(plain.encoder.state_dict().items(), kaiming.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def test_fastai_and_our_spelling_must_agree(gray_dls):
    with pytest.raises(TypeError, match="act_cls= and act= disagree"):
        more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, act='relu', act_cls=Mish)
    with pytest.raises(TypeError, match="did you mean 'self_attention'"):
        more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, self_atention=True)


@pytest.mark.parametrize('n_in', [1, 4])
def test_n_in_from_the_data_and_checked(data_factory, n_in):
    dls = make_dls(data_factory(n_in, 2), n_channels=n_in)
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)
    assert learn.model.n_in == n_in
    with pytest.raises(ValueError, match=f'the images have {n_in} channel'):
        more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False, n_in=3 if n_in != 3 else 1)


# ---- the fastai tools of a segmentation user
def test_lr_find_suggests_a_rate(gray_dls):
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False)
    suggestion = learn.lr_find(num_it=12, show_plot=False)
    assert 1e-7 < suggestion.valley < 10
    assert len(learn.recorder.losses) > 5


def _drawn_titles() -> list[str]:
    return [ax.get_title() for ax in plt.gcf().axes]


def test_show_results_binary_one_logit(data_factory):
    "A one-logit model with BCE: fastai's decoding thresholds the sigmoid, so show_results draws 0/1 masks."
    plt.close('all')
    dls = make_dls(data_factory(1, 2))
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False, n_out=1, loss_func=BCEWithLogitsLossFlat(axis=1))
    learn.fit(1, 1e-3)
    learn.show_results(max_n=2)
    masks = [ax.get_images()[1].get_array().data for ax in plt.gcf().axes]
    assert len(masks) == 4
    assert all(set(np.unique(m)) <= {0, 1} for m in masks)


def test_show_results_multiclass_and_interpretation(data_factory):
    plt.close('all')
    dls = make_dls(data_factory(1, 3), n_classes=3)
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)
    learn.fit(1, 1e-3)
    learn.show_results(max_n=2)
    assert len(plt.gcf().axes) == 4
    plt.close('all')
    interp = SegmentationInterpretation.from_learner(learn)
    losses, indices = interp.top_losses()
    assert len(losses) == len(dls.valid_ds) and bool((losses[:-1] >= losses[1:]).all())
    interp.plot_top_losses(k=2)
    assert len(plt.gcf().axes) >= 4


def test_channels_last_on_cpu(gray_dls):
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False).to_channelslast()
    learn.fit(1, 1e-3)
    x, _ = gray_dls.one_batch()
    with torch.no_grad(): out = learn.model.eval()(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (len(x), 2, *x.shape[-2:]) and torch.isfinite(out).all()


# ---- image to image
def gray_to_rgb_block() -> DataBlock:
    "Colourisation-like: grayscale inputs, RGB targets (the images of the same folder)."
    return DataBlock(blocks=(ImageBlock(PILImageBW), ImageBlock(PILImage)), get_items=get_image_files, splitter=RandomSplitter(0.25, seed=0))


def test_image_to_image_end_to_end(data_factory, tmp_path):
    path = data_factory(3, 2, size=(64, 64), n_images=8)
    dls = gray_to_rgb_block().dataloaders(path / 'images', bs=4, num_workers=0)
    learn = more_dynamic_unet_learner(dls, 'unet', encoder_kwargs=dict(features=8, depth=2), y_range=(0, 1), metrics=PSNR(),
                                      path=tmp_path)
    assert learn.model.n_out == 3 and learn.loss_func.func.__class__ is nn.MSELoss and learn.pretrained is False
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()
    preds, targets = learn.get_preds()
    assert preds.shape == targets.shape == (len(dls.valid_ds), 3, 64, 64)
    assert 0 <= preds.min() and preds.max() <= 1
    item = dls.valid_ds.items[0]
    decoded, _, raw = learn.predict(item)
    assert raw.shape == (3, 64, 64)
    learn.export('denoiser.pkl')
    torch.testing.assert_close(load_learner(tmp_path / 'denoiser.pkl').predict(item)[2], raw)
    plt.close('all')
    learn.show_results(max_n=2)
    assert len(plt.gcf().axes) == 6                                          # input, target, prediction for each


def test_image_to_image_data_check_catches_channel_and_size_mismatch(data_factory, tmp_path):
    path = data_factory(3, 2, size=(64, 64), n_images=8)
    dls = gray_to_rgb_block().dataloaders(path / 'images', bs=4, num_workers=0)
    with pytest.raises(ValueError, match=r'targets have 3 channel\(s\) but the model predicts n_out=1'):
        more_dynamic_unet_learner(dls, 'unet', n_out=1)
    small = tmp_path / 'small'                                               # targets of half the images' size
    small.mkdir()
    for f in get_image_files(path / 'images'): PILImage.create(f).resize((32, 32)).save(small / f.name)
    halved = DataBlock(blocks=(ImageBlock(PILImageBW), ImageBlock(PILImage)), get_items=get_image_files,
                       get_y=lambda f: small / f.name, splitter=RandomSplitter(0.25, seed=0))
    with pytest.raises(ValueError, match=r'are \(32, 32\) but images are \(64, 64\)'):
        more_dynamic_unet_learner(halved.dataloaders(path / 'images', bs=4, num_workers=0), 'unet')


# ---- the from-scratch U-Net through every layer: k-fold training, fold records, the ensemble
def test_unet_from_scratch_with_fastai_keywords_round_trips_through_fold_records(data_factory, tmp_path):
    path = data_factory(1, 2, size=(64, 64), n_images=12)
    df = make_folds([str(p) for p in sorted((path / 'images').glob('*.png'))], n_folds=2, seed=0)
    block = DataBlock(blocks=(ImageBlock(PILImageBW), MaskBlock(['bg', 'salt'])), get_x=ColReader('item'),
                      get_y=Pipeline([ColReader('item'), MaskFromFolder()]))
    options = dict(config='paper', encoder_kwargs=dict(features=8, depth=3, residual=True), self_attention=True,
                   act_cls=Mish, norm_type=NormType.Spectral, init=nn.init.kaiming_normal_, blur=True, bottle=True)
    train_folds(block, df, 'unet', tmp_path, epochs=1, bs=4, folds=[0], dls_kwargs=dict(num_workers=0), learner_kwargs=options)
    record = json.loads((tmp_path / 'fold_0.json').read_text())
    assert record['arch'] == 'unet' and record['encoder_kwargs'] == dict(features=8, depth=3, residual=True)
    assert record['config']['attention'] == 'self' and record['config']['act'] == 'mish' and record['config']['norm'] == 'spectral'
    ensemble = FoldEnsemble.from_dir(tmp_path, device='cpu', folds=[0])       # rebuilt from the record, weights loaded strictly
    assert ensemble.models[0].model.encoder.channels == [8, 16, 32, 64]
    assert all(hasattr(b.upsample.layers[0], 'weight_orig') for b in ensemble.models[0].model.blocks)   # spectral up-convolutions
    valid = list(df['item'][df.fold == 0])
    oof = torch.from_numpy(np.load(fold_paths(tmp_path, 0)['oof']).astype(np.float32))
    torch.testing.assert_close(ensemble.predict(valid, tta=False, progress=False), oof, atol=2e-3, rtol=1e-2)
