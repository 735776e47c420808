"""MoreDynamicUnet: every option alone and combined, any input size, gradients everywhere, and a pure forward
(torch.export, torch.jit.trace, ONNX, torch.compile)."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision.models as tvm

from fastunet.unet.config import UnetConfig
from fastunet.unet.model import MoreDynamicUnet
from fastunet.unet.plan import plan_decoder

OPTIONS = {
    'default': {},
    'eq_skip': dict(decoder_widths='eq_skip'),
    'explicit_widths': dict(decoder_widths=[64, 48, 32, 24, 16]),
    'middle_scale_2': dict(middle_scale=2),
    'middle_scale_half_attention': dict(middle_scale=0.5, middle_attention=True),
    'middle_attention_only': dict(middle_attention=True),
    'pixel_shuffle': dict(upsample='pixel_shuffle'),
    'pixel_shuffle_blur': dict(upsample='pixel_shuffle', blur=True),
    'transposed': dict(upsample='transposed'),
    'nearest': dict(upsample='nearest'),
    'scse': dict(attention='scse'),
    'self_attention': dict(attention='self'),
    'attention_gates': dict(attention_gates=True),
    'hypercolumns': dict(hypercolumns=True),
    'last_cross': dict(last_cross=True),
    'residual_head': dict(residual_head=True),
    'group_norm_silu': dict(norm='group', act='silu'),
    'instance_norm_gelu': dict(norm='instance', act='gelu'),
    'no_norm_leaky': dict(norm=None, act='leaky_relu'),
    'halve_pixel_shuffle_cross': dict(decoder_widths='halve', upsample='pixel_shuffle', last_cross=True, residual_head=True),
    'everything': dict(decoder_widths='eq_skip', middle_scale=1.5, middle_attention=True, upsample='pixel_shuffle',
                       blur=True, attention='scse', attention_gates=True, hypercolumns=True, last_cross=True,
                       residual_head=True, norm='batch', act='mish'),
    'everything_transposed_self': dict(upsample='transposed', attention='self', attention_gates=True, hypercolumns=True,
                                       last_cross=True, residual_head=True, middle_scale=1),
}


def every_parameter_has_a_gradient(model, out):
    model.zero_grad()
    out.square().mean().backward()
    return [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize('options', OPTIONS.values(), ids=OPTIONS.keys())
def test_option_shapes_and_gradients(options):
    model = MoreDynamicUnet('resnet10t', n_out=3, n_in=1, **options)
    for size in [(101, 101), (64, 96), (37, 130)]:
        out = model(torch.randn(2, 1, *size))
        assert out.shape == (2, 3, *size)
        assert torch.isfinite(out).all()
    assert every_parameter_has_a_gradient(model, out) == []


@pytest.mark.parametrize('arch', ['convnext_atto', 'swin_tiny_patch4_window7_224', 'test_vit'])
@pytest.mark.parametrize('config', ['blog', 'everything'])
@pytest.mark.slow
def test_stride_four_and_single_stride_encoders_with_heavy_configs(arch, config):
    "The blog model's final concat broke on stride-4-first encoders; here every layout returns the input's size."
    model = MoreDynamicUnet(arch, n_out=2, n_in=3, config=UnetConfig.blog() if config == 'blog' else UnetConfig(**OPTIONS['everything']))
    out = model(torch.randn(2, 3, 101, 101))
    assert out.shape == (2, 2, 101, 101)
    assert every_parameter_has_a_gradient(model, out) == []


def test_blog_halve_does_not_crash_at_the_final_block():
    "In the blog post's code, 'halve' widths crash at the final block with a channel mismatch."
    model = MoreDynamicUnet('resnet10t', n_out=1, config=UnetConfig.blog(decoder_widths='halve'))
    assert model(torch.randn(1, 3, 101, 101)).shape == (1, 1, 101, 101)


def test_config_round_trips_through_json():
    config = UnetConfig(**OPTIONS['everything'])
    assert UnetConfig(**json.loads(json.dumps(config.as_dict()))) == config
    model = MoreDynamicUnet('resnet10t', n_out=2, config=config, hypercolumns=False)
    assert model.config == config.replace(hypercolumns=False)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="upsample must be one of"):
        UnetConfig(upsample='bicubic')
    with pytest.raises(ValueError, match="attention must be"):
        UnetConfig(attention='cbam')
    with pytest.raises(ValueError, match='decoder_widths has 2 entries but this encoder needs 5'):
        MoreDynamicUnet('resnet10t', decoder_widths=[32, 16])
    with pytest.raises(ValueError, match="norm must be one of"):
        MoreDynamicUnet('resnet10t', norm='layer')
    with pytest.raises(TypeError, match="'upsampl' \\(did you mean 'upsample'\\?\\)"):
        MoreDynamicUnet('resnet10t', upsampl='nearest')


def test_unet_config_options_show_in_the_signatures():
    "`UnetConfig`'s fields are keywords of the model and the learner, with their documentation (fastcore docments)."
    import inspect
    from fastcore.docments import docments
    from fastunet.learner.unet_learner import more_dynamic_unet_learner
    for function in (MoreDynamicUnet.__init__, more_dynamic_unet_learner):
        parameters = inspect.signature(function).parameters
        assert set(UnetConfig.fields()) <= set(parameters) and 'kwargs' not in parameters
        assert docments(function)['upsample'].startswith("'pixel_shuffle' (ICNR)")


def test_wrong_channel_count_is_a_clear_error():
    model = MoreDynamicUnet('resnet10t', n_out=2, n_in=3)
    with pytest.raises(ValueError, match='built for 3-channel images but got 1'):
        model(torch.randn(1, 1, 64, 64))


def test_forward_stores_nothing():
    "Two different inputs in a row give the same result as each alone: no state kept between calls."
    model = MoreDynamicUnet('resnet10t', n_out=2, config=UnetConfig(**OPTIONS['everything'])).eval()
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        alone = model(a)
        model(b)
        torch.testing.assert_close(model(a), alone)
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())


EXPORT_CASES = {'default': ('resnet10t', {}), 'everything': ('resnet10t', OPTIONS['everything']),
                'torchvision': (tvm.resnet18, dict(upsample='pixel_shuffle', last_cross=True)),
                'swin_blog': ('swin_tiny_patch4_window7_224', dict(UnetConfig.blog().as_dict()))}


@pytest.mark.parametrize('case', EXPORT_CASES, ids=EXPORT_CASES.keys())
@pytest.mark.slow
def test_torch_export_and_trace(case):
    arch, options = EXPORT_CASES[case]
    model = MoreDynamicUnet(arch, n_out=2, **options).eval()
    x = torch.randn(2, 3, 101, 101)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-4)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install onnxruntime)')
    model = MoreDynamicUnet('resnet10t', n_out=2, upsample='pixel_shuffle', attention='scse').eval()
    x = torch.randn(1, 3, 96, 128)
    path = tmp_path / 'unet.onnx'
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = MoreDynamicUnet('resnet10t', n_out=2).eval()
    compiled = torch.compile(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-3)


def test_channels_last_and_autocast():
    model = MoreDynamicUnet('resnet10t', n_out=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert torch.isfinite(model_cl(x)).all()


def test_decoder_plan_follows_the_encoder():
    assert [s.reduction for s in plan_decoder([4, 8, 16, 32], [40, 80, 160, 320], UnetConfig())] == [16, 8, 4, 2, 1]
    assert [s.skip_index for s in plan_decoder([1, 2, 4], [8, 16, 32], UnetConfig())] == [1, 0]
