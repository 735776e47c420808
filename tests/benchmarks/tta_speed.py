"""D4 TTA throughput: fastunet's `transform_tta` on its prepared model (`inference_model`) against a ttach-style loop (one
forward per transform on the model in eval mode, each prediction de-augmented and averaged, as `ttach.SegmentationTTAWrapper`
does), same model, same batch, same eight transforms. Rows separate what each step gives: the prepared model with one
pass per transform, transformed copies stacked into shared passes (the default), `torch.compile`, and bfloat16 autocast
(opt-in on CPU: it rounds more). Each row the median of timed batches after warm-up, in one process, with the largest
difference of its probabilities from the loop's. The rows take turns batch by batch (round-robin), so that a drift of
the machine's speed, large on a shared virtual machine, falls on all of them alike.

    python tests/benchmarks/tta_speed.py [--encoder resnet34 --size 128 --batches 1,8 --steps 7 --threads 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

LOOP = 'ttach-style loop, eval model'


def cpu_bf16_flags() -> str:
    "The CPU's native bfloat16 instructions (avx512_bf16, amx_bf16), as /proc/cpuinfo lists them: without them bfloat16 is emulated."
    try: flags = next(line for line in Path('/proc/cpuinfo').read_text().splitlines() if line.startswith('flags')).split()
    except (OSError, StopIteration): return 'unknown'
    return ', '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'none'


def run(encoder: str = 'resnet34', size: int = 128, batches: tuple[int, ...] = (1, 8), steps: int = 7, threads: int = 2) -> dict:
    import torch
    import torchvision.models as tvm
    from fastunet.pipeline.inference import inference_model
    from fastunet.pipeline.tta import D4_TRANSFORMS, apply_transform, invert_transform, transform_tta
    from fastunet.unet.memory_format import use_memory_format
    from fastunet.unet.model import MoreDynamicUnet
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = use_memory_format(MoreDynamicUnet(getattr(tvm, encoder), n_out=2, n_in=3), 'cpu').eval()   # as the learner trains it
    softmax = lambda t: torch.softmax(t, 1)
    prepared = {'fp32': inference_model(model), 'compiled': inference_model(model, compile=True),
                'bf16': inference_model(model, autocast=torch.bfloat16)}
    results = {}
    for bs in batches:
        x = torch.rand(bs, 3, size, size)
        def ttach_style():                   # ttach's SegmentationTTAWrapper: one forward per transform, de-augment, mean
            with torch.no_grad():
                return sum(invert_transform(softmax(model(apply_transform(x, n))), n) for n in D4_TRANSFORMS) / len(D4_TRANSFORMS)
        steps_by_name = {LOOP: ttach_style,
                         'fastunet, prepared model, one pass per transform': lambda: transform_tta(prepared['fp32'], x, softmax, 'd4', pass_pixels=1),
                         'fastunet, prepared model, copies stacked (default)': lambda: transform_tta(prepared['fp32'], x, softmax, 'd4'),
                         'fastunet, stacked + compile=True': lambda: transform_tta(prepared['compiled'], x, softmax, 'd4'),
                         'fastunet, stacked + autocast=torch.bfloat16': lambda: transform_tta(prepared['bf16'], x, softmax, 'd4')}
        reference = ttach_style()
        differences = {name: (step() - reference).abs().max().item() for name, step in steps_by_name.items()}   # compiles too
        wrong = {name: d for name, d in differences.items() if 'bfloat16' not in name and d > 1e-4}
        if wrong: raise SystemExit(f'float32 predictors that do not give the loop\'s probabilities: {wrong}')
        for step in steps_by_name.values(): step()                          # warm-up: allocator, oneDNN primitive caches
        times = {name: [] for name in steps_by_name}
        for _ in range(steps):                                               # round-robin: drift falls on every row alike
            for name, step in steps_by_name.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        results[bs] = {name: dict(images_per_s=bs / statistics.median(times[name]), max_probability_difference=differences[name])
                       for name in steps_by_name}
    return dict(encoder=encoder, size=size, threads=threads, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cpu_bf16=cpu_bf16_flags(), batches=results)


def table(result: dict) -> str:
    lines = [f"**D4 TTA** ({result['encoder']} U-Net, untrained, {result['size']}², {result['threads']} CPU threads, "
             f"torch {result['torch']}; native bfloat16 instructions: {result['cpu_bf16']}). 8 predictions per image.", '']
    for bs, rows in result['batches'].items():
        reference = rows[LOOP]['images_per_s']
        lines += [f'Batch {bs}:', '', '| predictor | images/s | vs ttach-style | largest |Δp| from the loop |', '|---|---|---|---|']
        lines += [f"| {name} | {row['images_per_s']:.2f} | {row['images_per_s'] / reference:.2f}× | {row['max_probability_difference']:.1e} |"
                  for name, row in rows.items()]
        lines.append('')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--encoder', default='resnet34')
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--batches', default='1,8', help='batch sizes, comma-separated')
    parser.add_argument('--steps', type=int, default=7)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    result = run(args.encoder, args.size, tuple(int(b) for b in args.batches.split(',')), args.steps, args.threads)
    results = Path(__file__).parent / 'results'
    (results / 'tta_speed.md').write_text(table(result))
    (results / 'tta_speed.json').write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == '__main__':
    main()
