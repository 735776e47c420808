"""Accuracy on the ISBI 2012 membranes (`../shared/data/isbi2012`: 30 EM images, masks 0/255), every model
trained by the same fastai pipeline: grayscale, resize to 256, flips and 90° turns, the same seeded split
(24 training, 6 held out), one-cycle schedule, same epochs, batch size and learning rate, cross-entropy,
random initialisation (`pretrained=False`). Scores on the held-out images: foreground (mask 255, the
cells) IoU and Dice, and the IoU of the thin membranes (mask 0), which is where decoders differ.

    python tests/benchmarks/isbi_accuracy.py [--epochs 20 --seeds 0 --models 'smp Unet' 'fastunet default']
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ISBI = Path(__file__).resolve().parents[3] / 'shared' / 'data' / 'isbi2012'


def isbi_dls(seed: int, bs: int, size: int = 256):
    from fastai.vision.all import (DataBlock, Dihedral, ImageBlock, MaskBlock, PILImageBW, RandomSplitter, Resize,
                                   get_image_files)
    from fastunet.learner.data import MaskFromFolder
    block = DataBlock(blocks=(ImageBlock(cls=PILImageBW), MaskBlock(codes=['membrane', 'cell'])),
                      get_items=get_image_files, get_y=MaskFromFolder('labels', binary=True),
                      splitter=RandomSplitter(valid_pct=0.2, seed=42), item_tfms=Resize(size), batch_tfms=[Dihedral()])
    return block.dataloaders(ISBI / 'images', bs=bs, num_workers=0, seed=seed)


def scores(predicted, truth) -> dict:
    "Foreground (class 1) IoU and Dice, membrane (class 0) IoU, pooled over the held-out images."
    def iou(a, b): return ((a & b).sum() / (a | b).sum()).item()
    fg, true_fg = predicted == 1, truth == 1
    dice = (2 * (fg & true_fg).sum() / (fg.sum() + true_fg.sum())).item()
    return dict(foreground_iou=iou(fg, true_fg), foreground_dice=dice, membrane_iou=iou(~fg, ~true_fg))


def train_and_score(name: str, encoder: str, epochs: int, seed: int, bs: int, lr: float, threads: int) -> dict:
    import torch
    from fastai.vision.all import CrossEntropyLossFlat, set_seed
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
    from models import candidate
    torch.set_num_threads(threads)
    set_seed(seed, reproducible=True)
    dls = isbi_dls(seed, bs)
    learn = candidate(name).learner(dls, encoder, n_in=1, loss_func=CrossEntropyLossFlat(axis=1))
    start = time.time()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
        seconds = time.time() - start
        probs, truth = learn.get_preds(dl=dls.valid)
    return dict(model=name, seed=seed, epochs=epochs, train_seconds=round(seconds, 1), held_out=len(dls.valid_ds),
                **scores(probs.argmax(dim=1), truth))


def run(models: list[str], encoder: str = 'resnet34', epochs: int = 20, seeds: list[int] = (0,), bs: int = 4,
        lr: float = 3e-3, threads: int = 2) -> dict:
    if not ISBI.exists(): raise SystemExit(f'ISBI 2012 data not found at {ISBI}: the accuracy benchmark needs it')
    runs = []
    for seed in seeds:
        for name in models:
            runs.append(train_and_score(name, encoder, epochs, seed, bs, lr, threads))
            print(json.dumps(runs[-1]), flush=True)
    rows = []
    for name in models:
        mine = [r for r in runs if r['model'] == name]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ('foreground_iou', 'foreground_dice', 'membrane_iou', 'train_seconds')}
        rows.append(dict(model=name, seeds=len(mine), **mean))
    return dict(encoder=encoder, epochs=epochs, seeds=list(seeds), bs=bs, lr=lr, size=256, rows=rows, runs=runs)


def table(result: dict) -> str:
    seeds = result['seeds']
    lines = [f"**ISBI 2012, {result['encoder']}, 256×256, {result['epochs']} epochs one-cycle (lr {result['lr']}, batch "
             f"{result['bs']}), random init, 6 held-out images; mean of {len(seeds)} seed{'s' * (len(seeds) > 1)}**", '',
             '| model | foreground IoU | foreground Dice | membrane IoU |', '|---|---|---|---|']
    for r in result['rows']:
        lines.append(f"| {r['model']} | {r['foreground_iou']:.4f} | {r['foreground_dice']:.4f} | {r['membrane_iou']:.4f} |")
    return '\n'.join(lines)


def main():
    from models import MODELS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--encoder', default='resnet34')
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--models', nargs='+', default=[name for name, c in MODELS.items() if c.accuracy])
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    result = run(args.models, args.encoder, args.epochs, args.seeds)
    print(table(result))
    if args.out: Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
