"""The fold ensemble's speed and memory: k folds × flip TTA streamed into a submission, against one fold
without TTA (so 5 folds × 2 flips is set against 10 × a single model's inference), and its peak memory
against the number of images. Every measurement runs in a fresh process on generated 101×101 images;
memory is the resident set sampled after every image, against its value when prediction starts.

    python tests/benchmarks/ensemble.py [--folds 5 --sizes 200 800 --arch resnet10t]
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


def measure(model_dir: str, images_dir: str, n: int, folds: int, tta: bool, threads: int) -> dict:
    "Run in a child process: stream the first `folds` folds' predictions for the first n images into a submission."
    import torch
    from fastunet.pipeline.ensemble import FoldEnsemble
    from fastunet.pipeline.submission import apply_threshold, rle_encode, write_submission
    torch.set_num_threads(threads)
    images = sorted(Path(images_dir).glob('*.png'))[:n]
    ensemble = FoldEnsemble.from_dir(model_dir, device='cpu')
    ensemble.models = ensemble.models[:folds]
    start_rss, highest = current_rss_mib(), [0.]
    def rows():
        for item, probs in ensemble.predict_iter(images, bs=16, tta=tta, progress=False):
            highest[0] = max(highest[0], current_rss_mib())
            yield Path(item).stem, rle_encode(apply_threshold(probs[-1][None], 0.5)[0])
    start = time.perf_counter()
    write_submission(rows(), Path(tempfile.mkdtemp()) / 'submission.csv')
    seconds = time.perf_counter() - start
    return dict(images=n, folds=folds, tta=tta, seconds=seconds, images_per_s=n / seconds, rss_at_start_mib=start_rss,
                highest_rss_while_predicting_mib=highest[0], growth_mib=highest[0] - start_rss,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run(folds: int = 5, sizes: list[int] = (200, 800), arch: str = 'resnet10t', threads: int = 2) -> dict:
    from fastunet.pipeline.workflow import run_training
    from fastunet.learner.synthetic import make_synthetic_dataset
    work = Path(tempfile.mkdtemp(prefix='fastunet_ensemble_'))
    train = make_synthetic_dataset(work / 'train', n_images=40, size=(101, 101))
    run_training(train, work, arch, folds, 1, 3e-3, 8, 0)        # the weights do not change speed or memory
    images = make_synthetic_dataset(work / 'test', n_images=max(sizes), size=(101, 101), seed=1) / 'images'
    def child(n, k, tta):
        out = subprocess.run([sys.executable, __file__, '--child', str(work / 'models'), str(images), str(n), str(k),
                              str(int(tta)), str(threads)], capture_output=True, text=True)
        if out.returncode: raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    single = child(min(sizes), 1, False)
    rows = [child(n, folds, True) for n in sizes]
    return dict(arch=arch, image_size=101, bs=16, threads=threads, folds=folds, single=single, ensemble=rows,
                ensemble_vs_ten_singles=rows[0]['images_per_s'] / (single['images_per_s'] / (2 * folds)))


def table(result: dict) -> str:
    single, rows, k = result['single'], result['ensemble'], result['folds']
    lines = [f"**Fold ensemble, {result['arch']}, {result['image_size']}×{result['image_size']} images, batch {result['bs']}, "
             f"streamed into a submission** — {k} folds × flip TTA run at "
             f"{result['ensemble_vs_ten_singles']:.2f}× the speed of {2 * k} separate single-model passes", '',
             '| predictor | images | images/s | RSS at start (MiB) | highest RSS while predicting (MiB) | growth (MiB) |',
             '|---|---|---|---|---|---|']
    for r in [single] + rows:
        name = f"{r['folds']} fold{'s' * (r['folds'] > 1)}{' × flip TTA' if r['tta'] else ''}"
        lines.append(f"| {name} | {r['images']} | {r['images_per_s']:.1f} | {r['rss_at_start_mib']:.0f} | "
                     f"{r['highest_rss_while_predicting_mib']:.0f} | {r['growth_mib']:.0f} |")
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--sizes', type=int, nargs='+', default=[200, 800])
    parser.add_argument('--arch', default='resnet10t')
    parser.add_argument('--child', nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, images, n, k, tta, threads = args.child
        print(json.dumps(measure(model_dir, images, int(n), int(k), bool(int(tta)), int(threads))))
        return
    result = run(args.folds, args.sizes, args.arch)
    print(table(result))
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
