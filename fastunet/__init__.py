"""Modules:

- `fastunet.pipeline.inference`: A trained model prepared for prediction: batch norm folded into the convolutions before it, the device's memory format, `torch.inference_mode`, autocast on CUDA, optionally compiled. The fold ensemble, the TTA helpers and `fastunet predict` all predict through it; the trained model and its weight files are never changed."""

__version__ = "0.1.0"
