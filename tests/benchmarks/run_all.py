"""Every benchmark that sets fastunet beside fastai's `unet_learner` and smp's `Unet`, in one command:
speed and memory (resnet34 @ 128 batch 8, resnet50 @ 256 batch 4), accuracy on ISBI 2012, the fold
ensemble, and large images (tiled prediction beside MONAI's, ISBI whole vs tiled). Prints the tables and writes
`results/benchmarks.json` and `results/performance.md`, and for large images `results/tiling.md` and
`results/tiled_isbi.md` (which the README includes: `python tools/make_readme.py` after a run).

    python tests/benchmarks/run_all.py                     # everything (about 1.5 h on 2 CPU cores)
    python tests/benchmarks/run_all.py --only speed        # one section; the others keep their last results
    python tests/benchmarks/run_all.py --only tiling       # large images (about 12 min)
    python tests/benchmarks/run_all.py --only accuracy --models 'smp Unet' 'fastunet default'   # some rows again

A partial run replaces only what it measured, so every figure in the files comes from a benchmark run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ensemble
import isbi_accuracy
import speed
import tiled_isbi
import tiling
from models import MODELS, REFERENCE, candidate

RESULTS = Path(__file__).parent / 'results'
SPEED_SETTINGS = {'resnet34@128': dict(encoder='resnet34', size=128, bs=8), 'resnet50@256': dict(encoder='resnet50', size=256, bs=4)}
DEFAULT = 'fastunet default'
TRAINING_TARGET = 1.15                              # fastunet's default against smp's Unet, training images/s (issue 13)
INFERENCE_TARGETS = {'resnet34@128': 1.3}           # inference images/s through `inference_model`, where a target is set


def merge_rows(old: dict | None, new: dict) -> dict:
    """`new`'s rows replace `old`'s rows of the same model; other rows stay (a partial run updates only what it ran).
    Results measured under other settings (epochs, sizes, machine figures aside) are dropped, not mixed in."""
    settings = lambda result: {k: v for k, v in result.items() if k not in ('rows', 'runs', 'conv_peak_gflops_per_s')}
    if not old or settings(old) != settings(new): return new
    fresh, kept = {r['model']: r for r in new['rows']}, {r['model'] for r in old['rows']}
    rows = [fresh.get(r['model'], r) for r in old['rows']] + [r for name, r in fresh.items() if name not in kept]
    merged = dict(new, rows=rows)
    if 'runs' in old: merged['runs'] = [r for r in old['runs'] if r['model'] not in fresh] + new['runs']
    return merged


def targets(results: dict) -> str:
    "The default configuration against the issue's targets, each with its margin."
    lines = ['| target | measured | met |', '|---|---|---|']
    for key, result in results.get('speed', {}).items():
        rows = {r['model']: r for r in result['rows']}
        if DEFAULT not in rows or REFERENCE not in rows: continue
        mine, ref = rows[DEFAULT], rows[REFERENCE]
        inference_target = INFERENCE_TARGETS.get(key, 1.0)
        for label, field, better, target in (
                (f'training images/s ≥ {TRAINING_TARGET}× smp', 'train_images_per_s', 'higher', TRAINING_TARGET),
                (f'inference images/s (inference_model) ≥ {inference_target}× smp', 'infer_images_per_s', 'higher', inference_target),
                ('bytes saved for backward ≤ smp', 'saved_for_backward_mib', 'lower', 1.0)):
            ratio = mine[field] / ref[field]
            met = ratio >= target if better == 'higher' else ratio <= target
            lines.append(f'| {key}: {label} | {ratio:.2f}× smp | {"yes" if met else "**no**"} |')
    if 'ensemble' in results:
        ratio = results['ensemble']['ensemble_vs_ten_singles']
        lines.append(f"| fold ensemble: {results['ensemble']['folds']} folds × flip TTA ≥ 1.0× the throughput of "
                     f"{2 * results['ensemble']['folds']} single-model passes | {ratio:.2f}× | {'yes' if ratio >= 1 else '**no**'} |")
    accuracy = results.get('accuracy')
    if accuracy:
        rows = {r['model']: r for r in accuracy['rows']}
        others = [rows[m] for m in ('fastai unet_learner', REFERENCE) if m in rows]
        if DEFAULT in rows and others:
            best = max(others, key=lambda r: r['foreground_iou'])
            margin = rows[DEFAULT]['foreground_iou'] - best['foreground_iou']
            lines.append(f"| ISBI foreground IoU ≥ best of fastai and smp ({best['model']}, {best['foreground_iou']:.4f}) | "
                         f"{rows[DEFAULT]['foreground_iou']:.4f} ({margin:+.4f}) | {'yes' if margin >= 0 else '**no**'} |")
    return '\n'.join(lines)


def cpu_name() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines() if Path('/proc/cpuinfo').exists() else []:
        if line.startswith('model name'): return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def report(results: dict) -> str:
    machine = results.get('machine', {})
    parts = [f"<!-- Written by tests/benchmarks/run_all.py; do not edit by hand. -->",
             f"Measured on {machine.get('cpu', 'this machine')}, {machine.get('threads')} threads, torch {machine.get('torch')}, "
             f"{machine.get('date')}. Ratios are against smp's `Unet` on the same encoder.",
             '#### fastunet\'s default configuration against the targets', targets(results)]
    for key, result in results.get('speed', {}).items(): parts.append(speed.table(result, REFERENCE))
    if 'accuracy' in results: parts.append(isbi_accuracy.table(results['accuracy']))
    if 'ensemble' in results: parts.append(ensemble.table(results['ensemble']))
    return '\n\n'.join(parts) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', nargs='+', choices=['speed', 'accuracy', 'ensemble', 'tiling'],
                        default=['speed', 'accuracy', 'ensemble', 'tiling'])
    parser.add_argument('--models', nargs='+', default=list(MODELS), help='models for the speed and accuracy sections')
    parser.add_argument('--speed', nargs='+', choices=list(SPEED_SETTINGS), default=list(SPEED_SETTINGS))
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / 'benchmarks.json'
    results = json.loads(path.read_text()) if path.exists() else {}
    def save():
        results['machine'] = dict(cpu=cpu_name(), threads=args.threads, torch=torch.__version__,
                                  date=time.strftime('%Y-%m-%d'))
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        (RESULTS / 'performance.md').write_text(report(results))
    if 'speed' in args.only:
        for key in args.speed:
            new = speed.run(**SPEED_SETTINGS[key], rounds=args.rounds, threads=args.threads, models=args.models)
            results.setdefault('speed', {})[key] = merge_rows(results.get('speed', {}).get(key), new)
            print(speed.table(new, REFERENCE) if REFERENCE in args.models else json.dumps(new['rows']), '\n', flush=True)
            save()
    if 'accuracy' in args.only:
        trained = [m for m in args.models if candidate(m).accuracy]
        new = isbi_accuracy.run(trained, epochs=args.epochs, seeds=args.seeds, threads=args.threads)
        results['accuracy'] = merge_rows(results.get('accuracy'), new)
        print(isbi_accuracy.table(results['accuracy']), '\n', flush=True)
        save()
    if 'ensemble' in args.only:
        results['ensemble'] = ensemble.run(threads=args.threads)
        print(ensemble.table(results['ensemble']), '\n', flush=True)
        save()
    if 'tiling' in args.only:                        # its own files, included in the README's section on large images
        for benchmark, options in ((tiling, {}), (tiled_isbi, dict(epochs=10))):
            result = benchmark.run(threads=args.threads, **options)
            benchmark.save(result)
            print(benchmark.table(result), '\n', flush=True)
    print(targets(results))


if __name__ == '__main__':
    main()
