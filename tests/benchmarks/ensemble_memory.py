"""Memory and speed of the fold ensemble against the number of images: k folds × flip TTA streamed into a
submission, for N generated 101×101 images, each N in a fresh process. Memory is the process's resident set
sampled after every image while predicting, against its value when prediction starts: if anything were kept
per image, the growth would scale with N.

    python tests/benchmarks/ensemble_memory.py [--sizes 500 5000 --folds 5 --out ensemble_memory.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def current_rss_mib() -> float:
    "This process's resident memory now (not its high-water mark), from /proc."
    return int(Path('/proc/self/statm').read_text().split()[1]) * resource.getpagesize() / 2 ** 20


def measure(model_dir: str, images_dir: str, n: int) -> dict:
    "Run in a child process: stream the ensemble's predictions for the first n images into a submission."
    import torch
    from fastunet.ensemble import FoldEnsemble
    from fastunet.submission import apply_threshold, rle_encode, write_submission
    torch.set_num_threads(2)
    images = sorted(Path(images_dir).glob('*.png'))[:n]
    ensemble = FoldEnsemble.from_dir(model_dir, device='cpu')
    start_rss, highest = current_rss_mib(), [0.]
    def rows():
        for i, p in ensemble.predict_iter(images, bs=16, progress=False):
            highest[0] = max(highest[0], current_rss_mib())
            yield Path(i).stem, rle_encode(apply_threshold(p[-1][None], 0.5)[0])
    start = time.time()
    write_submission(rows(), Path(tempfile.mkdtemp()) / 'submission.csv')
    seconds = time.time() - start
    return dict(images=n, folds=len(ensemble.models), seconds=round(seconds, 1), images_per_second=round(n / seconds, 1),
                rss_at_start_mib=round(start_rss, 1), highest_rss_while_predicting_mib=round(highest[0], 1),
                growth_mib=round(highest[0] - start_rss, 1),
                peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[500, 5000])
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--arch', default='resnet10t')
    parser.add_argument('--out', default='ensemble_memory.json')
    parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], int(args.child[2]))))
        return
    from fastunet.cli import run_training
    from fastunet.data import make_synthetic_dataset
    work = Path(tempfile.mkdtemp(prefix='fastunet_ensemble_'))
    train = make_synthetic_dataset(work / 'train', n_images=40, size=(101, 101))
    run_training(train, work, args.arch, args.folds, 1, 3e-3, 8, 0)          # weights do not change the memory used
    images = make_synthetic_dataset(work / 'test', n_images=max(args.sizes), size=(101, 101), seed=1) / 'images'
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, '--child', str(work / 'models'), str(images), str(n)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print('| images | folds × flip TTA | seconds | images/s | RSS at start MiB | highest RSS while predicting MiB | growth MiB |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['images']} | {r['folds']} × 2 | {r['seconds']} | {r['images_per_second']} | {r['rss_at_start_mib']} | "
              f"{r['highest_rss_while_predicting_mib']} | {r['growth_mib']} |")
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
