"""more_dynamic_unet_learner end to end on generated data: training, freezing, export round trip, weights
from local files, offline errors and the data checks."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision.models as tvm
from fastai.vision.all import PILMask, load_learner, resnet34
from safetensors.torch import save_file

from fastunet.learner.data import MaskFromFolder
from fastunet.learner.unet_learner import more_dynamic_unet_learner
from fastunet.encoders.weights import PretrainedWeightsUnavailable

from conftest import make_dls


def encoder_conv_weights(learn) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learn.model.encoder.named_parameters() if p.ndim == 4}


def test_fit_one_epoch_grayscale_101(gray_dls):
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False)
    assert learn.model.n_in == 1 and learn.model.n_out == 2
    learn.fit_one_cycle(1, 1e-3)
    loss = learn.recorder.losses[-1]
    assert torch.isfinite(loss)
    probs, targets = learn.get_preds()
    assert probs.shape == (len(gray_dls.valid_ds), 2, 101, 101)
    assert targets.shape == (len(gray_dls.valid_ds), 101, 101)


@pytest.mark.parametrize('n_channels,n_classes,arch', [(3, 2, resnet34), (4, 3, 'resnet10t'), (1, 4, 'se_resnet50')])
def test_rgb_four_channel_and_multiclass(data_factory, n_channels, n_classes, arch):
    dls = make_dls(data_factory(n_channels, n_classes, size=(64, 80), n_images=8), n_channels, n_classes)
    learn = more_dynamic_unet_learner(dls, arch, pretrained=False)
    assert learn.model.n_in == n_channels and learn.model.n_out == n_classes
    learn.fit(1, 1e-4)
    probs, _ = learn.get_preds()
    assert probs.shape[1:] == (n_classes, 64, 80)


def test_training_improves_the_fit(data_factory):
    "A real check that gradients flow to the right place: the training loss falls on an easy data set."
    dls = make_dls(data_factory(1, 2, size=(64, 64), n_images=40), bs=4)
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)
    learn.fit_one_cycle(4, 3e-3)
    losses = [float(l) for l in learn.recorder.losses]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def timm_weights_file(tmp_path, name='resnet10t'):
    "A local weights file, as a user would have downloaded it: the full classification model's state dict."
    torch.manual_seed(1)
    source = timm.create_model(name, pretrained=False)
    path = tmp_path / f'{name}.safetensors'
    save_file(source.state_dict(), str(path))
    return source, path


def test_weights_from_local_file_and_freeze(gray_dls, tmp_path):
    source, path = timm_weights_file(tmp_path)
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', weights=path)
    stem = learn.model.encoder.model.conv1[0]
    # grayscale: the stem's RGB filters are summed, as timm does
    torch.testing.assert_close(stem.weight, source.conv1[0].weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(learn.model.encoder.model.layer4[0].conv2.weight, source.layer4[0].conv2.weight)
    # local weights count as pretrained: normalised with the encoder's stats, and frozen
    assert any(type(t).__name__ == 'Normalize' for t in gray_dls.after_batch.fs)
    assert len(learn.opt.param_groups) == 2
    before = encoder_conv_weights(learn)
    decoder_before = learn.model.head.weight.detach().clone()
    learn.fit(1, 1e-3)
    after = encoder_conv_weights(learn)
    assert all(torch.equal(before[n], after[n]) for n in before), 'frozen encoder weights changed'
    assert not torch.equal(decoder_before, learn.model.head.weight), 'decoder did not train'
    learn.unfreeze()
    learn.fit(1, 1e-3)
    assert any(not torch.equal(after[n], p) for n, p in encoder_conv_weights(learn).items()), 'unfrozen encoder did not train'


def test_weights_for_torchvision_and_pretrainedmodels(gray_dls, tmp_path):
    torch.manual_seed(2)
    tv_source = tvm.resnet18(weights=None)
    torch.save(tv_source.state_dict(), tmp_path / 'resnet18.pth')
    learn = more_dynamic_unet_learner(gray_dls, tvm.resnet18, weights=tmp_path / 'resnet18.pth')
    torch.testing.assert_close(learn.model.encoder.body.get_submodule('layer3.1.conv1').weight, tv_source.layer3[1].conv1.weight)

    import pretrainedmodels
    pm_source = pretrainedmodels.se_resnet50(num_classes=1000, pretrained=None)
    torch.save({'state_dict': pm_source.state_dict()}, tmp_path / 'se_resnet50.pth')    # a wrapped checkpoint
    learn = more_dynamic_unet_learner(gray_dls, 'se_resnet50', weights=tmp_path / 'se_resnet50.pth')
    torch.testing.assert_close(learn.model.encoder.body.get_submodule('layer4.2.conv3').weight, pm_source.layer4[2].conv3.weight)


def test_bad_weights_files_are_named(gray_dls, tmp_path):
    _, other = timm_weights_file(tmp_path, 'resnet18')
    with pytest.raises(ValueError, match="could not load weights"):
        more_dynamic_unet_learner(gray_dls, 'resnet10t', weights=other)
    with pytest.raises(ValueError, match='do not fit'):
        more_dynamic_unet_learner(gray_dls, tvm.resnet34, weights=other)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'\x80\x04garbage')
    with pytest.raises(ValueError, match='cannot be read'):
        more_dynamic_unet_learner(gray_dls, tvm.resnet18, weights=corrupt)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        more_dynamic_unet_learner(gray_dls, 'resnet10t', weights=tmp_path / 'missing.safetensors')


def test_pickled_objects_are_refused(gray_dls, tmp_path):
    "weights_only=True: a checkpoint that would run code when unpickled is not loaded."
    class Payload:
        def __reduce__(self): return (os.system, ('echo pwned',))
    path = tmp_path / 'evil.pth'
    torch.save({'conv1.weight': Payload()}, path)
    with pytest.raises(ValueError, match='cannot be read'):
        more_dynamic_unet_learner(gray_dls, tvm.resnet18, weights=path)


@pytest.mark.parametrize('arch', [tvm.resnet18, 'se_resnet50'], ids=['torchvision', 'pretrainedmodels'])
def test_offline_pretrained_says_what_to_pass(gray_dls, arch):
    with pytest.raises(PretrainedWeightsUnavailable, match="pass weights="):
        more_dynamic_unet_learner(gray_dls, arch, pretrained=True)


def test_offline_pretrained_timm_says_what_to_pass():
    code = ("from fastunet.encoders.registry import create_encoder\n"
            "try: create_encoder('resnet10t', pretrained=True)\n"
            "except Exception as e: print(type(e).__name__, e)\n")
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300).stdout
    assert 'PretrainedWeightsUnavailable' in out and "pass weights=" in out


def test_export_load_learner_predict_round_trip(gray_dls, tmp_path):
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, path=tmp_path, upsample='pixel_shuffle')
    learn.fit(1, 1e-3)
    learn.export('model.pkl')
    loaded = load_learner(tmp_path / 'model.pkl')
    image = gray_dls.valid_ds.items[0]
    mask, _, probs = learn.predict(image)
    loaded_mask, _, loaded_probs = loaded.predict(image)
    assert mask.shape == (101, 101) and probs.shape == (2, 101, 101)
    torch.testing.assert_close(loaded_probs, probs)
    assert torch.equal(loaded_mask, mask)


class LeftHalfSalt(nn.Module):
    "A stand-in model whose prediction is known: class 1 on the left half of every image."
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))    # fastai finds the device through the parameters
    def forward(self, x):
        logits = torch.zeros(len(x), 2, *x.shape[-2:], device=x.device)
        logits[:, 1, :, :x.shape[-1] // 2] = 1.
        return logits


def test_show_results_draws_each_target_and_the_models_prediction(gray_dls):
    import matplotlib.pyplot as plt
    plt.close('all')
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False)
    learn.model = LeftHalfSalt()
    learn.show_results(max_n=2)
    drawn = [torch.as_tensor(ax.get_images()[1].get_array().data) for ax in plt.gcf().axes]   # the mask over each image
    _, targets = gray_dls.valid.one_batch()
    left_half = torch.zeros(101, 101, dtype=torch.long)
    left_half[:, :50] = 1
    assert len(drawn) == 4
    assert sum(torch.equal(mask, left_half) for mask in drawn) == 2                      # the two predictions
    for target in targets[:2].cpu(): assert any(torch.equal(mask, target) for mask in drawn)   # and both targets


def open_mask_as_255(image_path):
    return PILMask.create(np.array(PILMask.create(MaskFromFolder().path(image_path))) * 255)


def test_masks_of_0_and_255_are_refused_with_a_fix(data_factory):
    path = data_factory(1, 2)
    dls = make_dls(path, label_func=open_mask_as_255)
    with pytest.raises(ValueError, match=r"masks hold the values \[0, 255\].*2 class\(es\).*MaskFromFolder\('masks', binary=True\)"):
        more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)
    # and the suggested fix works
    fixed = make_dls(path, label_func=MaskFromFolder(binary=True))
    more_dynamic_unet_learner(fixed, 'resnet10t', pretrained=False)


def test_ignore_index_values_are_allowed(data_factory):
    from fastai.losses import CrossEntropyLossFlat
    dls = make_dls(data_factory(1, 2), label_func=open_mask_as_255)
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False,
                                      loss_func=CrossEntropyLossFlat(axis=1, ignore_index=255))
    assert learn.model.n_out == 2


def test_channel_mismatch_is_refused(gray_dls):
    with pytest.raises(ValueError, match=r'1 channel\(s\) but n_in=3'):
        more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, n_in=3)


def test_mask_size_mismatch_is_refused(data_factory):
    path = data_factory(1, 2)
    def small_mask(image_path): return PILMask.create(np.array(PILMask.create(MaskFromFolder().path(image_path)))[:50, :50])
    dls = make_dls(path, label_func=small_mask)
    with pytest.raises(ValueError, match='masks are .* but images are'):
        more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)


def test_fine_tune_freezes_then_unfreezes(gray_dls, tmp_path):
    _, path = timm_weights_file(tmp_path)
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', weights=path)
    before = encoder_conv_weights(learn)
    learn.fine_tune(1, base_lr=1e-3, freeze_epochs=1)
    assert all(p.requires_grad for p in learn.model.encoder.parameters())
    assert any(not torch.equal(before[n], p) for n, p in encoder_conv_weights(learn).items())


def test_compiled_learner_matches_eager_and_keeps_weight_names(gray_dls, tmp_path):
    "compile=dict(fullgraph=True) compiles in place: same outputs as the eager model, same state-dict names, export works."
    torch.manual_seed(0)
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, compile=dict(fullgraph=True))
    learn.fit(1, 1e-3)
    compiled_probs, _ = learn.get_preds()
    eager = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False)
    eager.model.load_state_dict(learn.model.state_dict())       # the same names: no '_orig_mod.' prefix
    eager_probs, _ = eager.get_preds()
    torch.testing.assert_close(compiled_probs, eager_probs, rtol=1e-3, atol=1e-4)
    learn.export(tmp_path / 'compiled.pkl')
    assert load_learner(tmp_path / 'compiled.pkl').predict(gray_dls.valid_ds.items[0])[0].shape == (101, 101)


def test_grad_checkpointing_learner_trains_and_saves_memory(gray_dls):
    learn = more_dynamic_unet_learner(gray_dls, 'resnet10t', pretrained=False, grad_checkpointing=True)
    assert learn.model.checkpoint_decoder and not learn.model.checkpoint_whole_encoder   # timm: stage by stage
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 1e-3)
    assert all(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
