"""Speed and memory of each model in `models.MODELS`, each measured in a fresh subprocess.

Per model: parameters; FLOPs per image (forward) and per training step (forward + backward), counted by
`torch.utils.flop_counter.FlopCounterMode`; bytes saved for backward (every tensor autograd keeps, counted
once per storage through `torch.autograd.graph.saved_tensors_hooks`); peak resident memory of the process
(`ru_maxrss`, which includes the libraries: the RSS after imports is given too); training images/s (AdamW
step on cross-entropy) and inference images/s (`torch.inference_mode`), each the median of timed steps after
two warm-up steps. Inference is measured twice: as each library's users predict (fastunet: through
`inference_model`, which its ensemble, TTA and CLI use: batch norm folded, channels-last; the others: the
model in eval mode) and as the plain eval model. Rounds are interleaved over the models and each model keeps its fastest round (for
training and for inference separately), so a burst of load on the machine does not land on one model only. Achieved FLOP/s is set against the FLOP/s this machine reaches
on one large convolution.

    python tests/benchmarks/speed.py [--encoder resnet34 --size 128 --bs 8 --steps 5 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def median_seconds(step, steps: int) -> float:
    step(); step()                                  # warm-up: allocator, oneDNN primitive caches
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_conv_flops(threads: int) -> float:
    "FLOP/s of one large 3×3 convolution (256→256 channels, 8×64×64): what this machine reaches on dense work."
    import torch
    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).eval()
    x = torch.randn(8, 256, 64, 64)
    with torch.inference_mode():
        seconds = median_seconds(lambda: conv(x), 5)
    return 2 * 8 * 256 * 64 * 64 * 256 * 9 / seconds


def measure(name: str, encoder: str, size: int, bs: int, steps: int, threads: int) -> dict:
    "Run in a child process: every figure for one model."
    import torch
    import torch.nn as nn
    from torch.utils.flop_counter import FlopCounterMode
    from models import candidate
    torch.set_num_threads(threads)
    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = candidate(name).model(encoder, 3, 2, size)
    x, target = torch.randn(bs, 3, size, size), torch.randint(0, 2, (bs, size, size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def train_step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    model.train()
    with FlopCounterMode(display=False) as counter: nn.functional.cross_entropy(model(x), target).backward()
    train_flops = counter.get_total_flops()
    seen, saved = set(), 0
    def pack(t):
        nonlocal saved
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen: seen.add(key); saved += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.functional.cross_entropy(model(x), target).backward()
    train_seconds = median_seconds(train_step, steps)
    model.eval()
    predictor = candidate(name).predictor(model)
    with torch.inference_mode():
        infer_seconds = median_seconds(lambda: predictor(x), steps)
        plain_infer_seconds = median_seconds(lambda: model(x), steps)
        with FlopCounterMode(display=False) as counter: model(x[:1])
    return dict(model=name, params=sum(p.numel() for p in model.parameters()),
                gflops_per_image=counter.get_total_flops() / 1e9, train_gflops_per_step=train_flops / 1e9,
                saved_for_backward_mib=saved / 2 ** 20, train_images_per_s=bs / train_seconds,
                infer_images_per_s=bs / infer_seconds, plain_infer_images_per_s=bs / plain_infer_seconds, achieved_train_gflops_per_s=train_flops / train_seconds / 1e9,
                rss_after_imports_mib=rss_after_imports,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run(encoder: str, size: int, bs: int, steps: int = 5, rounds: int = 2, threads: int = 2,
        models: list[str] | None = None) -> dict:
    "Every model in a fresh subprocess, `rounds` times interleaved; each model keeps its fastest training and inference."
    from models import MODELS
    names = models or list(MODELS)
    measured = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            out = subprocess.run([sys.executable, __file__, '--child', name, '--encoder', encoder, '--size', str(size),
                                  '--bs', str(bs), '--steps', str(steps), '--threads', str(threads)],
                                 capture_output=True, text=True)
            if out.returncode: raise RuntimeError(f'{name} failed:\n{out.stderr[-3000:]}')
            measured[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name in names:
        row = max(measured[name], key=lambda r: r['train_images_per_s'])
        for field in ('infer_images_per_s', 'plain_infer_images_per_s'): row[field] = max(r[field] for r in measured[name])
        rows.append(row)
    peak = peak_conv_flops(threads)
    for row in rows: row['fraction_of_conv_peak'] = row['achieved_train_gflops_per_s'] * 1e9 / peak
    return dict(encoder=encoder, size=size, bs=bs, threads=threads, steps=steps, rounds=rounds,
                conv_peak_gflops_per_s=peak / 1e9, rows=rows)


def table(result: dict, reference: str) -> str:
    "A markdown table with ratios against the reference model."
    ref = next(r for r in result['rows'] if r['model'] == reference)
    lines = [f"**{result['encoder']}, {result['size']}×{result['size']}, batch {result['bs']}** "
             f"({result['threads']} threads; one large convolution reaches {result['conv_peak_gflops_per_s']:.0f} GFLOP/s)", '',
             '| model | params (M) | GFLOPs / image | train img/s | infer img/s | infer, plain eval model | saved for backward (MiB) '
             '| peak RSS (MiB) | achieved / conv peak | train vs smp | infer vs smp | saved vs smp |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in result['rows']:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['gflops_per_image']:.2f} | {r['train_images_per_s']:.2f} | "
                     f"{r['infer_images_per_s']:.2f} | {r.get('plain_infer_images_per_s', float('nan')):.2f} | {r['saved_for_backward_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['fraction_of_conv_peak']:.0%} | {r['train_images_per_s'] / ref['train_images_per_s']:.2f}× | "
                     f"{r['infer_images_per_s'] / ref['infer_images_per_s']:.2f}× | "
                     f"{r['saved_for_backward_mib'] / ref['saved_for_backward_mib']:.2f}× |")
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--encoder', default='resnet34')
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--bs', type=int, default=8)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--models', nargs='*')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.encoder, args.size, args.bs, args.steps, args.threads)))
        return
    from models import REFERENCE
    result = run(args.encoder, args.size, args.bs, args.steps, args.rounds, args.threads, args.models)
    print(table(result, REFERENCE))
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
