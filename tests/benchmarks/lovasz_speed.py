"""Vectorised Lovász against a per-image Python loop (the reference implementation's structure).

Batch 32 of 128×128 logits, forward + backward, median of repeated runs, on this machine's CPU threads
(and on the GPU when one is present). Prints a table and writes lovasz_speed.json (or --out).


    python tests/benchmarks/lovasz_speed.py [--batch 32 --size 128 --repeats 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastunet.learner.losses import lovasz_hinge, lovasz_softmax


def looped_hinge(logits, labels):
    "What the reference code does with per_image=True: one flattened image at a time."
    return torch.stack([lovasz_hinge(l[None], t[None], per_image=False) for l, t in zip(logits, labels)]).mean()


def looped_softmax(probas, labels):
    return torch.stack([lovasz_softmax(p[None], t[None], per_image=False) for p, t in zip(probas, labels)]).mean()


def timed(fn, make_input, repeats, device):
    times = []
    for _ in range(repeats + 2):
        x = make_input()
        if device == 'cuda': torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x).backward()
        if device == 'cuda': torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--out', default='lovasz_speed.json')
    args = parser.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    b, s = args.batch, args.size
    labels = torch.randint(0, 2, (b, s, s), device=device)
    labels3 = torch.randint(0, 3, (b, s, s), device=device)
    binary = lambda: torch.randn(b, s, s, device=device, requires_grad=True)
    multi = lambda: torch.randn(b, 3, s, s, device=device, requires_grad=True)
    rows = []
    for name, ours, looped, make in [
            ('lovasz_hinge per_image', lambda x: lovasz_hinge(x, labels), lambda x: looped_hinge(x, labels), binary),
            ('lovasz_softmax per_image', lambda x: lovasz_softmax(F.softmax(x, 1), labels3, per_image=True),
             lambda x: looped_softmax(F.softmax(x, 1), labels3), multi)]:
        vectorised, loop = timed(ours, make, args.repeats, device), timed(looped, make, args.repeats, device)
        rows.append(dict(loss=name, batch=b, size=s, device=device, threads=torch.get_num_threads(),
                         vectorised_ms=round(vectorised * 1e3, 2), loop_ms=round(loop * 1e3, 2), speedup=round(loop / vectorised, 2)))
    print(f"| loss | batch × size | device | vectorised ms | per-image loop ms | speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['batch']} × {r['size']}² | {r['device']} ({r['threads']} threads) | {r['vectorised_ms']} | {r['loop_ms']} | {r['speedup']}× |")
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
