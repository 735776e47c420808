"""The encoder contract across timm, pretrainedmodels and torchvision: NCHW features shallow→deep whose
channels and strides match what the encoder declares, a U-Net that returns the input's size at 101×101 and
a non-square size, gradients everywhere, and no hooks anywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from fastunet.encoders.contract import Encoder, EncoderInfo
from fastunet.encoders.registry import create_encoder
from fastunet.encoders.timm_features import TimmEncoder
from fastunet.encoders.traced import PRETRAINEDMODELS_UNSUPPORTED, TracedEncoder, pretrainedmodels_names
from fastunet.unet.model import MoreDynamicUnet

SIZES = [(101, 101), (64, 96)]

# one small model per timm family the issue names, and a few more layouts (NHWC, stride 4, patch 14, single stride)
TIMM_FAMILIES = [
    'resnet10t', 'resnext26ts', 'seresnext26d_32x4d', 'efficientnet_b0', 'mobilenetv3_small_050', 'regnetx_002',
    'convnext_atto', 'swin_tiny_patch4_window7_224', 'densenet121', 'hrnet_w18_small', 'vit_tiny_patch16_224',
    'test_vit', 'test_maxvit', 'test_nfnet', 'test_byobnet', 'test_efficientnet', 'vit_small_patch14_dinov2',
    'levit_128s',    # attention tables for 224×224 only: resampled to its native size and back
    'pit_ti_224',    # timm extracts its features with hooks by default: built with the hook-free getter
    'convit_tiny',   # caches tensors on its modules during forward: the size probe must leave none behind
]
PRETRAINEDMODELS = ['resnet18', 'bninception', 'inceptionv4', 'alexnet', 'densenet121', 'squeezenet1_1', 'vgg11_bn',
                    'dpn68', 'xception', 'se_resnext50_32x4d', 'cafferesnet101']
TORCHVISION = [tvm.resnet18, tvm.resnet34, tvm.resnext50_32x4d, tvm.densenet121, tvm.vgg11_bn, tvm.mobilenet_v2,
               tvm.mobilenet_v3_small, tvm.efficientnet_b0, tvm.convnext_tiny, tvm.regnet_x_400mf, tvm.squeezenet1_1,
               tvm.shufflenet_v2_x0_5, tvm.mnasnet0_5]


def hooks_in(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


def check_unet(arch, n_in: int, n_out: int = 2) -> MoreDynamicUnet:
    "Build a U-Net on `arch` and check the contract, output sizes, gradients and hooks."
    model = MoreDynamicUnet(arch, n_out=n_out, n_in=n_in, pretrained=False)
    encoder = model.encoder
    assert hooks_in(model) == [], 'hooks registered'
    assert isinstance(encoder.info, EncoderInfo) and encoder.n_in == n_in == len(encoder.stats[0])
    for height, width in SIZES:
        x = torch.randn(2, n_in, height, width)
        padded = torch.nn.functional.pad(x, (0, -width % encoder.size_divisor, 0, -height % encoder.size_divisor))
        encoder.info.check_features(encoder(padded), padded.shape[-2:])     # the contract's own check, on real tensors
        out = model(x)
        assert out.shape == (2, n_out, height, width)
        assert torch.isfinite(out).all()
    model.zero_grad()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:5]}'
    assert hooks_in(model) == []
    return model


@pytest.mark.parametrize('n_in', [1, 3])
@pytest.mark.parametrize('name', TIMM_FAMILIES)
def test_timm_families(name, n_in):
    model = check_unet(name, n_in)
    assert isinstance(model.encoder, TimmEncoder)


def test_swin_features_are_nchw():
    encoder = TimmEncoder('swin_tiny_patch4_window7_224')
    assert encoder.channels_last_output
    features = encoder(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [96, 192, 384, 768]
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]


@pytest.mark.parametrize('n_in', [1, 3])
@pytest.mark.parametrize('name', PRETRAINEDMODELS)
def test_pretrainedmodels(name, n_in):
    model = check_unet(f'pretrainedmodels:{name}', n_in)
    assert isinstance(model.encoder, TracedEncoder)
    assert model.encoder.name.startswith('pretrainedmodels:')


def test_pretrainedmodels_stages_are_stage_outputs():
    "The traced stages of SE-ResNeXt are the block outputs (what hooks on layer0..layer4 would give), not inner branches."
    encoder = create_encoder('se_resnext50_32x4d')
    assert encoder.channels == [64, 256, 512, 1024, 2048]
    assert encoder.reductions == [2, 4, 8, 16, 32]


def test_every_pretrainedmodels_name_is_supported_or_explained():
    import pretrainedmodels
    supported = set(pretrainedmodels_names())
    assert supported | set(PRETRAINEDMODELS_UNSUPPORTED) == set(pretrainedmodels.model_names)
    for name in PRETRAINEDMODELS_UNSUPPORTED:
        with pytest.raises(ValueError, match='Supported: ') as error:
            create_encoder(f'pretrainedmodels:{name}')
        assert 'se_resnext50_32x4d' in str(error.value)


@pytest.mark.parametrize('n_in', [1, 3])
@pytest.mark.parametrize('arch', TORCHVISION, ids=lambda a: a.__name__)
def test_torchvision_callables(arch, n_in):
    model = check_unet(arch, n_in)
    assert isinstance(model.encoder, TracedEncoder)


def test_torchvision_resnet_stages_match_fastai():
    "resnet34's stages are what fastai's hooks would pick: the stem's ReLU and the outputs of layer1..layer4."
    encoder = create_encoder(tvm.resnet34)
    assert encoder.channels == [64, 64, 128, 256, 512]
    model = tvm.resnet34(weights=None).eval()
    encoder = TracedEncoder(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        layer1 = model.layer1(model.maxpool(stem))
        layer4 = model.layer4(model.layer3(model.layer2(layer1)))
        features = encoder.eval()(x)
    for ours, reference in zip([features[0], features[1], features[4]], [stem, layer1, layer4]):
        torch.testing.assert_close(ours, reference)


def test_an_nn_module_instance_works():
    check_unet(tvm.resnet18(weights=None), n_in=3)


def test_name_resolution():
    assert create_encoder('resnet18').name == 'timm:resnet18'                       # timm wins a shared name
    assert create_encoder('pretrainedmodels:resnet18').name == 'pretrainedmodels:resnet18'
    assert create_encoder('timm:resnet10t').name == 'timm:resnet10t'
    assert create_encoder('se_resnet50').name == 'pretrainedmodels:se_resnet50'     # only pretrainedmodels knows it
    assert create_encoder(tvm.resnet18).name == 'torchvision:resnet18'
    with pytest.raises(ValueError, match="did you mean 'resnet10t'"):
        create_encoder('resnet10x')
    with pytest.raises(ValueError, match="unknown encoder source 'keras'"):
        create_encoder('keras:resnet50')
    with pytest.raises(ValueError, match='timm has no model'):
        create_encoder('timm:se_resnext50_32x4d_nope')


def test_stem_adaptation_follows_timm():
    "n_in=1 sums the stem's RGB filters; n_in=4 cycles them, scaled by 3/4 (timm's adapt_input_conv)."
    source = tvm.resnet18(weights=None)
    rgb_weight = source.conv1.weight.detach().clone()
    gray = TracedEncoder(source, n_in=1)
    torch.testing.assert_close(gray.body.conv1.weight, rgb_weight.sum(dim=1, keepdim=True))
    four = TracedEncoder(tvm.resnet18(weights=None), n_in=4)
    assert four.body.conv1.weight.shape[1] == 4
    timm_four = create_encoder('resnet10t', n_in=4)
    assert timm_four(torch.randn(2, 4, 64, 64))[0].shape[1] == timm_four.channels[0]


class Liar(Encoder):
    "An adapter whose record does not describe its features: the deepest one has other channels than declared."
    def __init__(self, declared_channels):
        super().__init__()
        self.stem, self.stage = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.set_info(EncoderInfo('test:liar', 3, declared_channels, [2, 4], 4, ([0.5] * 3, [0.25] * 3)))
    def forward(self, x):
        shallow = self.stem(x)
        return [shallow, self.stage(shallow)]


def test_an_encoder_whose_record_lies_fails_when_built():
    assert Liar([8, 16]).channels == [8, 16]
    with pytest.raises(ValueError, match="encoder 'test:liar' breaks the encoder contract: feature 1 has 16 channels but declares 32"):
        Liar([8, 32])


@pytest.mark.parametrize('bad, message', [
    (dict(reductions=[4, 2]), 'shallow to deep'), (dict(channels=[8, 16, 32]), '3 channel counts but 2 reductions'), (dict(channels=[8], reductions=[2]), 'at least two features'),
    (dict(size_divisor=2), 'not a multiple of the deepest reduction 4'), (dict(n_in=1), 'one per input channel'),
    (dict(stats=([0.5] * 3, [0.] * 3)), 'standard deviations must be positive')])
def test_encoder_info_refuses_bad_records(bad, message):
    fields = dict(name='test:record', n_in=3, channels=[8, 16], reductions=[2, 4], size_divisor=4, stats=([0.5] * 3, [0.25] * 3))
    with pytest.raises(ValueError, match=message):
        EncoderInfo(**{**fields, **bad})


@pytest.mark.parametrize('n_in', [1, 3])
def test_unet_from_scratch_keeps_the_contract(n_in):
    model = check_unet('unet', n_in)
    assert model.encoder.channels == [64, 128, 256, 512, 1024] and model.encoder.reductions == [1, 2, 4, 8, 16]
