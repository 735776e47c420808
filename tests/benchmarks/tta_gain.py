"""Flip-TTA gain on the ISBI 2012 membranes: the same folds, each fold's model on its own held-out images,
with and without horizontal-flip TTA. Foreground (cell) IoU, Dice and pixel error at full 512×512 resolution.

    python tests/benchmarks/tta_gain.py [--folds 5 --epochs 15 --arch resnet10t --out tta_gain.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from fastunet.pipeline.workflow import run_training
from fastunet.learner.data import MaskFromFolder
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.records import load_fold_records

ISBI = Path(__file__).resolve().parents[3] / 'shared' / 'data' / 'isbi2012'


def scores(probs: torch.Tensor, truths: torch.Tensor) -> dict:
    pred = probs > 0.5
    intersection, union = (pred & truths).sum().item(), (pred | truths).sum().item()
    return dict(iou=intersection / union, dice=2 * intersection / (pred.sum().item() + truths.sum().item()),
                pixel_error=(pred != truths).float().mean().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--arch', default='resnet10t')
    parser.add_argument('--crop', type=int, default=128)
    parser.add_argument('--out', default='tta_gain.json')
    parser.add_argument('--workdir', default=None, help='keep the trained folds here (default: a temporary folder)')
    args = parser.parse_args()
    if not ISBI.exists(): raise SystemExit(f'ISBI data not found at {ISBI}')
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='fastunet_tta_'))
    start = time.time()
    run_training(ISBI, workdir, arch=args.arch, n_folds=args.folds, epochs=args.epochs, lr=3e-3, bs=4, seed=0, mask_folder='labels',
                 binary_masks=True, crop=args.crop)
    trained = time.time() - start
    df = pd.read_csv(workdir / 'folds.csv')
    mask_of = MaskFromFolder('labels', binary=True)
    ensemble = FoldEnsemble.from_dir(workdir / 'models', device='cpu')
    results = {False: [], True: []}
    for record, model in zip(load_fold_records(workdir / 'models'), ensemble.models):
        single = FoldEnsemble([model], record, device='cpu')
        items = list(df['item'][df.fold == record['fold']])
        truths = torch.stack([torch.from_numpy(mask_of.array(p)) > 0 for p in items])
        for tta in (False, True):
            probs = single.predict(items, bs=2, tta=tta, progress=False)[:, 0]
            results[tta].append((probs, truths))
    rows = []
    for tta in (False, True):
        probs, truths = torch.cat([p for p, _ in results[tta]]), torch.cat([t for _, t in results[tta]])
        rows.append(dict(tta=tta, **scores(probs, truths)))
    report = dict(arch=args.arch, folds=args.folds, epochs=args.epochs, crop=args.crop, train_seconds=round(trained, 1),
                  without_tta=rows[0], with_tta=rows[1])
    print('| flip TTA | IoU (cells) | Dice | pixel error |\n|---|---|---|---|')
    for r in rows: print(f"| {'yes' if r['tta'] else 'no'} | {r['iou']:.4f} | {r['dice']:.4f} | {r['pixel_error']:.4f} |")
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
    main()
