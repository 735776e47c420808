"""The models compared by the benchmarks, built the way a user of each library builds them, on one encoder.

Each candidate gives a bare model (for speed and memory) and a fastai `Learner` on given `DataLoaders`
(for accuracy): fastai through `unet_learner`, fastunet through `more_dynamic_unet_learner`, smp's `Unet`
wrapped in a plain `Learner`. Random weights everywhere (`pretrained=False`: nothing is downloaded).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


def _torchvision(encoder: str):
    import torchvision.models as tvm
    return getattr(tvm, encoder)


@dataclass
class Candidate:
    library: str                                   # 'fastai', 'smp' or 'fastunet'
    options: dict = field(default_factory=dict)    # fastunet configuration keywords
    grad_checkpointing: bool = False               # fastunet: recompute activations in the backward pass
    accuracy: bool = True                          # False: the same function as another row, measured for speed/memory only
    arch: str | None = None                        # fastunet: this encoder instead of the run's (e.g. 'unet', from scratch)

    def model(self, encoder: str, n_in: int, n_out: int, size: int) -> nn.Module:
        if self.library == 'fastai':
            from fastai.vision.learner import create_unet_model
            return create_unet_model(_torchvision(encoder), n_out, (size, size), pretrained=False, n_in=n_in)
        if self.library == 'smp':
            import segmentation_models_pytorch as smp
            return smp.Unet(encoder, encoder_weights=None, in_channels=n_in, classes=n_out)
        from fastunet.unet.memory_format import use_memory_format
        from fastunet.unet.model import MoreDynamicUnet
        model = MoreDynamicUnet(self.arch or _torchvision(encoder), n_out=n_out, n_in=n_in, **self.options)
        if self.grad_checkpointing: model.set_grad_checkpointing()
        return use_memory_format(model, 'cpu')        # what `more_dynamic_unet_learner` does: the device's memory format

    def predictor(self, model: nn.Module) -> nn.Module:
        "The model as this library's users predict with it: fastunet's prediction paths (ensemble, TTA, CLI) use `inference_model`."
        if self.library != 'fastunet': return model.eval()
        from fastunet.pipeline.inference import inference_model
        return inference_model(model)

    def learner(self, dls, encoder: str, n_in: int, **kwargs):
        from fastai.vision.all import Learner, get_c, unet_learner
        if self.library == 'fastai': return unet_learner(dls, _torchvision(encoder), pretrained=False, n_in=n_in, **kwargs)
        if self.library == 'smp': return Learner(dls, self.model(encoder, n_in, get_c(dls), 0), **kwargs)
        from fastunet.learner.unet_learner import more_dynamic_unet_learner
        return more_dynamic_unet_learner(dls, self.arch or _torchvision(encoder), pretrained=False, n_in=n_in,
                                         grad_checkpointing=self.grad_checkpointing, **self.options, **kwargs)


MODELS: dict[str, Candidate] = {
    'fastai unet_learner': Candidate('fastai'),
    'smp Unet': Candidate('smp'),
    'fastunet default': Candidate('fastunet'),
    "fastunet config='blog'": Candidate('fastunet', dict(config='blog')),
    'fastunet scSE + hypercolumns': Candidate('fastunet', dict(attention='scse', hypercolumns=True)),
    'fastunet default, grad_checkpointing=True': Candidate('fastunet', grad_checkpointing=True, accuracy=False),
}
# Other configurations, for choosing defaults (`--models` picks from both).
VARIANTS: dict[str, Candidate] = {
    'fastunet bilinear': Candidate('fastunet', dict(upsample='bilinear', conv_before_upsample=False)),
    'fastunet nearest': Candidate('fastunet', dict(upsample='nearest', conv_before_upsample=False)),
    # the original U-Net from scratch, at half the paper's widths (features 32: 24 GFLOPs at 256², the paper's 64 costs 96)
    "fastunet 'unet' (32 features), config='paper'": Candidate('fastunet', dict(config='paper', encoder_kwargs=dict(features=32)),
                                                               arch='unet'),
}
REFERENCE = 'smp Unet'


def candidate(name: str) -> Candidate:
    if name in MODELS: return MODELS[name]
    if name in VARIANTS: return VARIANTS[name]
    raise KeyError(f"unknown model '{name}': choose from {list(MODELS) + list(VARIANTS)}")
