"""Side by side, in one run on one machine: fastunet's MoreDynamicUnet (default and blog configurations),
fastai's `unet_learner` model (DynamicUnet) and segmentation_models_pytorch's `Unet`, on the same encoder.

Measures parameters, FLOPs per image (torch.utils.flop_counter), bytes saved for backward (counted with
torch.autograd.graph.saved_tensors_hooks), and training / inference images per second (median of timed
steps after warm-up). Prints a markdown table with ratios against smp and writes JSON.

    python tests/benchmarks/compare_models.py [--encoder resnet34 --size 128 --bs 8 --steps 5 --out compare.json]

A first step towards issue 5 (not yet: the ISBI accuracy comparison, peak RSS per subprocess, the resnet50
@256 row, achieved FLOP/s against the machine's peak, and choosing the defaults).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def fastai_unet(encoder: str, n_out: int) -> nn.Module:
    from fastai.vision.all import DynamicUnet, create_body
    import torchvision.models as tvm
    body = create_body(getattr(tvm, encoder)(weights=None), n_in=3, pretrained=False)
    return DynamicUnet(body, n_out, (128, 128))


def smp_unet(encoder: str, n_out: int) -> nn.Module:
    import segmentation_models_pytorch as smp
    return smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=n_out)


def fastunet_unet(encoder: str, n_out: int, **options) -> nn.Module:
    import torchvision.models as tvm
    from fastunet.model import MoreDynamicUnet
    return MoreDynamicUnet(getattr(tvm, encoder), n_out=n_out, n_in=3, **options)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    "Bytes of the tensors autograd keeps for backward (each storage counted once)."
    seen, total = set(), 0
    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).mean().backward()
    return total


def timed(step, steps: int) -> float:
    step(); step()                                  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, model: nn.Module, size: int, bs: int, steps: int) -> dict:
    x = torch.randn(bs, 3, size, size)
    target = torch.randint(0, 2, (bs, size, size))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def train_step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    train = timed(train_step, steps)
    activation = saved_bytes(model, x)
    model.eval()
    with torch.no_grad():
        infer = timed(lambda: model(x), steps)
        with FlopCounterMode(display=False) as counter: model(x[:1])
    return dict(model=name, params=sum(p.numel() for p in model.parameters()), gflops_per_image=counter.get_total_flops() / 1e9,
                saved_for_backward_mib=activation / 2 ** 20, train_images_per_s=bs / train, infer_images_per_s=bs / infer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--encoder', default='resnet34')
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--bs', type=int, default=8)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--out', default='compare.json')
    args = parser.parse_args()
    from fastunet.model import UnetConfig
    candidates = {'fastai unet_learner (DynamicUnet)': lambda: fastai_unet(args.encoder, 2),
                  'smp Unet': lambda: smp_unet(args.encoder, 2),
                  'fastunet default': lambda: fastunet_unet(args.encoder, 2),
                  'fastunet blog config': lambda: fastunet_unet(args.encoder, 2, config=UnetConfig.blog())}
    rows = []
    for name, build in candidates.items():
        torch.manual_seed(0)
        rows.append(measure(name, build(), args.size, args.bs, args.steps))
    reference = next(r for r in rows if r['model'] == 'smp Unet')
    print(f"{args.encoder}, {args.size}×{args.size}, batch {args.bs}, {torch.get_num_threads()} CPU threads\n")
    print('| model | params (M) | GFLOPs/img | saved for backward MiB | train img/s | infer img/s | train vs smp | memory vs smp |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['gflops_per_image']:.2f} | {r['saved_for_backward_mib']:.0f} | "
              f"{r['train_images_per_s']:.1f} | {r['infer_images_per_s']:.1f} | "
              f"{r['train_images_per_s'] / reference['train_images_per_s']:.2f}× | "
              f"{r['saved_for_backward_mib'] / reference['saved_for_backward_mib']:.2f}× |")
    with open(args.out, 'w') as f: json.dump(dict(encoder=args.encoder, size=args.size, bs=args.bs, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
