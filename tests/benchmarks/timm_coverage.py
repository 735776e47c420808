"""How many of timm's models build a working MoreDynamicUnet at 101×101?

For every name in `timm.list_models()`: build the U-Net (pretrained=False, 3 channels in, 2 out), run a
forward pass on a 2×3×101×101 batch (2: BatchNorm in squeeze-excite blocks needs it), check the output is 2×2×101×101 and finite, and run a backward pass.
Models above `--real-limit` parameters are checked on PyTorch's 'meta' device instead (shapes and autograd
without arithmetic: a 1B-parameter ViT would take minutes and gigabytes on a laptop CPU); their status is
'ok_meta'. Writes one JSON line per model (an interrupted run keeps what it measured, and a rerun resumes).

    python tests/benchmarks/timm_coverage.py --out timm_coverage.jsonl [--timeout 120] [--filter PATTERN]
"""
from __future__ import annotations

import argparse
import json
import signal
import time
from collections import Counter
from pathlib import Path

import timm
import torch

from fastunet.unet.model import MoreDynamicUnet


class _Timeout(BaseException): pass   # not an Exception: `check` must not swallow it


def _alarm(signum, frame): raise _Timeout()


def check(name: str, size: int = 101, real_limit: int = 60_000_000) -> dict:
    start = time.time()
    try:
        with torch.device('meta'): model = MoreDynamicUnet(name, n_out=2, n_in=3, pretrained=False)
        params = sum(p.numel() for p in model.parameters())
        device = 'meta' if params > real_limit else 'cpu'
        if device == 'cpu': model = MoreDynamicUnet(name, n_out=2, n_in=3, pretrained=False)
    except Exception as e:
        kind = 'no_features' if 'features_only' in str(e) or 'feature pyramid' in str(e) else 'build_error'
        return dict(model=name, status=kind, error=f'{type(e).__name__}: {str(e)[:300]}', seconds=round(time.time() - start, 1))
    try:
        out = model(torch.randn(2, 3, size, size, device=device))
        assert out.shape == (2, 2, size, size), f'output shape {tuple(out.shape)}'
        if device == 'cpu': assert torch.isfinite(out).all(), 'non-finite output'
        out.mean().backward()
        status, error = ('ok' if device == 'cpu' else 'ok_meta'), ''
    except Exception as e:
        status, error = 'forward_error', f'{type(e).__name__}: {str(e)[:300]}'
    return dict(model=name, status=status, error=error, params=params, seconds=round(time.time() - start, 1),
                reductions=model.encoder.reductions)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='timm_coverage.jsonl')
    parser.add_argument('--timeout', type=int, default=120, help='seconds per model before it counts as a timeout')
    parser.add_argument('--filter', default='', help='only models matching this pattern (timm.list_models syntax)')
    parser.add_argument('--real-limit', type=int, default=60_000_000, help='above this many parameters, check on the meta device')
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    done = {json.loads(l)['model'] for l in out.read_text().splitlines()} if out.exists() else set()
    names = [n for n in timm.list_models(args.filter or '*') if n not in done]
    signal.signal(signal.SIGALRM, _alarm)
    with out.open('a') as f:
        for name in names:
            signal.alarm(args.timeout)
            try: result = check(name, real_limit=args.real_limit)
            except _Timeout: result = dict(model=name, status='timeout', error=f'over {args.timeout}s')
            except MemoryError: result = dict(model=name, status='out_of_memory', error='')
            finally: signal.alarm(0)
            f.write(json.dumps(result) + '\n'); f.flush()
    results = [json.loads(l) for l in out.read_text().splitlines()]
    counts = Counter(r['status'] for r in results)
    with_features = len(results) - counts['no_features']
    working = counts['ok'] + counts['ok_meta']
    print(f"{len(results)} timm models; {with_features} support features_only; {working} build a working U-Net at 101×101 "
          f"({counts['ok']} run for real on the CPU, {counts['ok_meta']} checked on the meta device)")
    print(dict(counts))


if __name__ == '__main__':
    main()
