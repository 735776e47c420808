"""ISBI 2012 at full resolution: one model trained on random 256² tiles of the 512² images (`tile_dataloaders`), then the
six held-out images predicted whole and by 256² tiles with overlap 0.25 (Gaussian blending, mirrored borders, flip TTA
both ways; and with overlap 0.5, tiles of 384, no mirrored margin). Reported: foreground (cell) IoU and Dice and membrane IoU of each, pooled over the
held-out images, the share of pixels whose mask agrees with the whole-image prediction (everywhere, and 32 pixels or
more from the image's border), and the mean and largest difference of probabilities.

    python tests/benchmarks/tiled_isbi.py [--encoder resnet34 --epochs 10 --samples 128 --bs 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from isbi_accuracy import ISBI, scores  # noqa: E402


def run(encoder: str = 'resnet34', epochs: int = 10, samples: int = 128, bs: int = 4, lr: float = 3e-3, threads: int = 2) -> dict:
    "Train on random tiles, predict the held-out images whole and by tiles, score each."
    if not ISBI.exists(): raise SystemExit(f'ISBI 2012 data not found at {ISBI}: this benchmark needs it')
    import numpy as np
    import torch
    from fastai.vision.all import set_seed
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
    from PIL import Image
    from fastunet.learner.tiles import tile_dataloaders
    from fastunet.learner.unet_learner import more_dynamic_unet_learner
    from fastunet.pipeline.tiling import predict_tiled
    torch.set_num_threads(threads)
    set_seed(0, reproducible=True)
    images = sorted((ISBI / 'images').glob('*.png'))
    masks = [ISBI / 'labels' / image.name for image in images]
    held_out = set(np.random.default_rng(42).permutation(len(images))[:6].tolist())
    train = [i for i in range(len(images)) if i not in held_out]
    valid = sorted(held_out)
    dls = tile_dataloaders([images[i] for i in train], [masks[i] for i in train], [images[i] for i in valid], [masks[i] for i in valid],
                           tile=256, samples=samples, bs=bs, binary=True, codes=['membrane', 'cell'], num_workers=0)
    learn = more_dynamic_unet_learner(dls, encoder, pretrained=False)
    start = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    train_seconds = time.time() - start
    truth = torch.stack([torch.from_numpy(np.array(Image.open(masks[i])) > 0) for i in valid]).long()
    predictions, seconds = {}, {}
    for name, options in [('whole 512²', dict(tile=512)), ('tiles 256, overlap 0.25', dict(tile=256, overlap=0.25)),
                          ('tiles 256, overlap 0.5', dict(tile=256, overlap=0.5)), ('tiles 384, overlap 0.25', dict(tile=384, overlap=0.25)),
                          ('tiles 256, overlap 0.25, no mirrored margin', dict(tile=256, overlap=0.25, reflect=False))]:
        start = time.time()
        predictions[name] = torch.stack([predict_tiled(learn, images[i], **options)[1] for i in valid])
        seconds[name] = time.time() - start
    whole = predictions['whole 512²']
    rows = [dict(prediction=name, seconds=round(seconds[name], 1), **scores((p > 0.5).long(), truth),
                 masks_equal_to_whole=((whole > 0.5) == (p > 0.5)).float().mean().item(),
                 interior_masks_equal=((whole > 0.5) == (p > 0.5))[:, 32:-32, 32:-32].float().mean().item(),
                 mean_abs_difference=(whole - p).abs().mean().item(),
                 max_abs_difference=(whole - p).abs().max().item()) for name, p in predictions.items()]
    return dict(encoder=encoder, epochs=epochs, samples_per_epoch=samples, bs=bs, train_seconds=round(train_seconds, 1),
                held_out=[images[i].name for i in valid], rows=rows)


def table(result: dict) -> str:
    lines = [f"**ISBI 2012, whole vs tiled** ({result['encoder']}, trained on random 256² tiles: {result['epochs']} epochs × "
             f"{result['samples_per_epoch']} tiles, {result['train_seconds']:.0f} s; 6 held-out 512² images, flip TTA)", '',
             '| prediction | foreground IoU | foreground Dice | membrane IoU | mask equal to whole | the same, 32 px from the border '
             '| mean / max abs. Δp | seconds |', '|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['prediction']} | {r['foreground_iou']:.4f} | {r['foreground_dice']:.4f} | {r['membrane_iou']:.4f} | "
              f"{r['masks_equal_to_whole']:.3%} | {r['interior_masks_equal']:.3%} | {r['mean_abs_difference']:.4f} / {r['max_abs_difference']:.3f} | {r['seconds']} |"
              for r in result['rows']]
    return '\n'.join(lines)


def save(result: dict) -> None:
    "results/tiled_isbi.md (which the README includes) and results/tiled_isbi.json."
    results = Path(__file__).parent / 'results'
    (results / 'tiled_isbi.md').write_text(table(result) + '\n')
    (results / 'tiled_isbi.json').write_text(json.dumps(result, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--encoder', default='resnet34')
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--samples', type=int, default=128)
    parser.add_argument('--bs', type=int, default=4)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    result = run(args.encoder, args.epochs, args.samples, args.bs, args.lr, args.threads)
    save(result)
    print(table(result))


if __name__ == '__main__':
    main()
