"""The fold ensemble's speed and memory: k folds × flip TTA streamed into a submission, against one fold
without TTA (so 5 folds × 2 flips is set against 10 × a single model's pass over the same images), and its
peak memory against the number of images; with the default image readers (none where torch's threads take every
core, as here) and with one background reader, and compiled.
Every measurement runs in a fresh process on generated 101×101 images. One batch of each shape the run
will see is predicted and timed apart first ('first batch': `torch.compile`'s compilation, one graph per
shape, and oneDNN's first-call set-up); images/s is over all images after it. Memory is the resident set sampled after every image, against its value when prediction starts.

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


BS = 16

def measure(model_dir: str, images_dir: str, n: int, folds: int, tta: bool, threads: int, workers: int | None,
            compile: bool) -> dict:
    "Run in a child process: stream the first `folds` folds' predictions for the first n images into a submission."
    import torch
    from fastunet.pipeline.ensemble import FoldEnsemble, default_workers
    from fastunet.pipeline.submission import apply_threshold, rle_encode, write_submission
    torch.set_num_threads(threads)
    images = sorted(Path(images_dir).glob('*.png'))
    ensemble = FoldEnsemble.from_dir(model_dir, device='cpu', folds=list(range(folds)), compile=compile)
    start = time.perf_counter()
    # warm-up, for each batch shape the run will see (a full batch and the last, partial one): compilation, oneDNN set-up
    for shape in {BS, n % BS} - {0}: list(ensemble.predict_iter(images[-shape:], bs=BS, tta=tta, progress=False, num_workers=0))
    first_batch = time.perf_counter() - start
    start_rss, highest = current_rss_mib(), [0.]
    def rows():
        for item, probs in ensemble.predict_iter(images[:n], bs=BS, tta=tta, progress=False, num_workers=workers):
            highest[0] = max(highest[0], current_rss_mib())
            yield Path(item).stem, rle_encode(apply_threshold(probs[-1][None], 0.5)[0])
    start = time.perf_counter()
    write_submission(rows(), Path(tempfile.mkdtemp()) / 'submission.csv')
    seconds = time.perf_counter() - start
    return dict(images=n, folds=folds, tta=tta, workers=default_workers() if workers is None else workers, compile=compile,
                first_batch_seconds=first_batch, seconds=seconds, images_per_s=n / seconds, rss_at_start_mib=start_rss,
                highest_rss_while_predicting_mib=highest[0], growth_mib=highest[0] - start_rss,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run(folds: int = 5, sizes: list[int] = (200, 800), arch: str = 'resnet10t', threads: int = 2) -> dict:
    from fastunet.pipeline.workflow import run_training
    from fastunet.learner.synthetic import make_synthetic_dataset
    work = Path(tempfile.mkdtemp(prefix='fastunet_ensemble_'))
    train = make_synthetic_dataset(work / 'train', n_images=40, size=(101, 101))
    run_training(train, work, arch=arch, n_folds=folds, epochs=1, lr=3e-3, bs=8, seed=0)        # the weights do not change speed or memory
    images = make_synthetic_dataset(work / 'test', n_images=max(sizes), size=(101, 101), seed=1) / 'images'
    def child(n, k, tta, workers=None, compile=False):
        out = subprocess.run([sys.executable, __file__, '--child', str(work / 'models'), str(images), str(n), str(k),
                              str(int(tta)), str(threads), str(-1 if workers is None else workers), str(int(compile))],
                             capture_output=True, text=True)
        if out.returncode: raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    n = min(sizes)
    singles = [child(n, 1, False), child(n, 1, False, workers=1)]        # the default readers, and one reader
    rows = [child(size, folds, True) for size in sizes] + [child(n, folds, True, workers=1), child(n, folds, True, compile=True)]
    best_single = max(r['images_per_s'] for r in singles)
    return dict(arch=arch, image_size=101, bs=BS, threads=threads, folds=folds, single=singles[0], singles=singles, ensemble=rows,
                ensemble_vs_ten_singles=rows[0]['images_per_s'] / (best_single / (2 * folds)))


def table(result: dict) -> str:
    rows, k = result['ensemble'], result['folds']
    lines = [f"**Fold ensemble, {result['arch']}, {result['image_size']}×{result['image_size']} images, batch {result['bs']}, "
             f"streamed into a submission** — {k} folds × flip TTA run at "
             f"{result['ensemble_vs_ten_singles']:.2f}× the throughput of {2 * k} separate single-model passes (the faster single row)", '',
             '| predictor | image readers | images | first batch of each shape (s) | images/s | RSS at start (MiB) | highest RSS while predicting (MiB) | growth (MiB) |',
             '|---|---|---|---|---|---|---|---|']
    for r in result.get('singles', [result['single']]) + rows:
        name = f"{r['folds']} fold{'s' * (r['folds'] > 1)}{' × flip TTA' if r['tta'] else ''}{', compiled' if r.get('compile') else ''}"
        readers = r.get('workers', 0) or 'none (in the main process)'
        lines.append(f"| {name} | {readers} | {r['images']} | {r.get('first_batch_seconds', float('nan')):.1f} | {r['images_per_s']:.1f} | "
                     f"{r['rss_at_start_mib']:.0f} | {r['highest_rss_while_predicting_mib']:.0f} | {r['growth_mib']:.0f} |")
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--sizes', type=int, nargs='+', default=[200, 800])
    parser.add_argument('--arch', default='resnet10t')
    parser.add_argument('--child', nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, images, n, k, tta, threads, workers, compile = args.child
        print(json.dumps(measure(model_dir, images, int(n), int(k), bool(int(tta)), int(threads),
                                 None if int(workers) < 0 else int(workers), bool(int(compile)))))
        return
    result = run(args.folds, args.sizes, args.arch)
    print(table(result))
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
