"""Mixed precision through fastai's own `MixedPrecision` callback (what `learn.to_fp16()` / `to_bf16()` add),
with every loss. fastai names CUDA for autocast and the gradient scaler; this machine has no GPU, so the test
runs the same callback with both moved to the CPU: half-precision model outputs, fastai's loss scaling and
step skipping, our Lovász losses computed from them."""
from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.vision.all import set_seed

from fastunet.learner.unet_learner import more_dynamic_unet_learner

from conftest import make_dls
from test_losses_training import LOSSES


class CPUMixedPrecision(MixedPrecision):
    "fastai's `MixedPrecision`, with autocast and `GradScaler` on the CPU instead of CUDA."
    def before_fit(self):
        super().before_fit()
        dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        self.autocast = torch.autocast('cpu', dtype=dtype)
        self.learn.scaler = torch.amp.GradScaler('cpu', **self.kwargs)


class RecordPrecision(Callback):
    "The model's output dtype (before MixedPrecision casts it to float32), every training loss, skipped steps."
    order = MixedPrecision.order - 1
    def before_fit(self): self.dtypes, self.losses, self.skipped = set(), [], 0
    def after_cancel_step(self): self.skipped += 1
    def after_pred(self): self.dtypes.add(self.pred.dtype)
    def after_loss(self):
        if self.training: self.losses.append(self.loss.item())


@pytest.fixture(scope='module')
def salt_dls(data_factory):
    return make_dls(data_factory(1, 2, size=(32, 32), n_images=16), bs=4)


@pytest.mark.parametrize('amp_mode', ['fp16', 'bf16'])
@pytest.mark.parametrize('name', LOSSES)
@pytest.mark.slow
def test_every_loss_trains_in_mixed_precision(salt_dls, name, amp_mode):
    loss_cls, n_out = LOSSES[name]
    set_seed(0, reproducible=True)
    learn = more_dynamic_unet_learner(salt_dls, 'test_resnet', pretrained=False, n_out=n_out, loss_func=loss_cls())
    before = [p.detach().clone() for p in learn.model.parameters()]
    record, precision = RecordPrecision(), CPUMixedPrecision(amp_mode)
    learn.fit(2, 1e-3, cbs=[record, precision])
    assert record.dtypes == {torch.float16 if amp_mode == 'fp16' else torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(loss)) for loss in record.losses)
    assert record.skipped <= len(record.losses) // 2   # fp16 skips the first steps while the loss scale settles
    changed = [not torch.equal(a, b) for a, b in zip(before, learn.model.parameters())]
    assert all(changed), f'{changed.count(False)} parameters did not change: a gradient was lost'


def test_to_fp16_and_to_bf16_add_fastai_callbacks(salt_dls):
    learn = more_dynamic_unet_learner(salt_dls, 'test_resnet', pretrained=False, n_out=1, loss_func=LOSSES['symmetric_lovasz'][0]())
    assert isinstance(learn.to_fp16().mixed_precision, MixedPrecision)
    learn.to_fp32()
    assert isinstance(learn.to_bf16().mixed_precision, MixedPrecision)


def test_heads_and_ema_train_in_mixed_precision(salt_dls):
    "The heads' dict of outputs goes through fastai's float32 cast; EMA moves on the steps taken, not the skipped ones."
    from fastunet.learner.ema import EMA
    from fastunet.learner.head_losses import MultiHeadLoss
    set_seed(0, reproducible=True)
    learn = more_dynamic_unet_learner(salt_dls, 'test_resnet', pretrained=False, n_out=1, loss_func=LOSSES['bce_lovasz'][0](),
                                      deep_supervision=True, classifier=True, ema=0.9)
    assert isinstance(learn.loss_func, MultiHeadLoss)
    ema = learn.cbs.filter(lambda cb: isinstance(cb, EMA))[0]
    outputs = []
    class RecordOutputs(Callback):
        order = MixedPrecision.order + 1          # after fastai has cast the outputs back to float32
        def after_pred(self):
            if self.training: outputs.append({k: (v[0] if isinstance(v, list) else v).dtype for k, v in self.pred.items()})
    record = RecordPrecision()
    record.after_pred = lambda: None              # the model returns a dict here; its dtypes are checked after the cast
    learn.fit(2, 1e-3, cbs=[record, CPUMixedPrecision('fp16'), RecordOutputs()])
    assert outputs and all(o == {'out': torch.float32, 'aux': torch.float32, 'nonempty': torch.float32} for o in outputs)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in record.losses)
    assert ema.steps == len(record.losses) - record.skipped > 0
    assert all(torch.isfinite(p).all() for p in learn.model.state_dict().values() if p.is_floating_point())
