"""D4 TTA throughput: fastunet's `transform_tta` on its prepared model (`inference_model`) against a ttach-style loop (one
forward per transform on the model in eval mode, each prediction de-augmented and averaged, as `ttach.SegmentationTTAWrapper`
does), same model, same batch, same eight transforms. Each side the median of timed batches after warm-up, in one process.

    python tests/benchmarks/tta_speed.py [--encoder resnet34 --size 128 --bs 8 --steps 5 --threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from speed import median_seconds  # noqa: E402  (the same timing as the speed benchmark)


def run(encoder: str = 'resnet34', size: int = 128, bs: int = 8, steps: int = 5, threads: int = 2) -> dict:
    import torch
    import torchvision.models as tvm
    from fastunet.pipeline.inference import inference_model
    from fastunet.pipeline.tta import D4_TRANSFORMS, apply_transform, invert_transform, transform_tta
    from fastunet.unet.memory_format import use_memory_format
    from fastunet.unet.model import MoreDynamicUnet
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = use_memory_format(MoreDynamicUnet(getattr(tvm, encoder), n_out=2, n_in=3), 'cpu').eval()   # as the learner trains it
    prepared = inference_model(model)
    x = torch.rand(bs, 3, size, size)
    def ttach_style():                       # ttach's SegmentationTTAWrapper: one forward per transform, de-augment, mean
        with torch.no_grad():
            return sum(invert_transform(torch.softmax(model(apply_transform(x, n)), 1), n) for n in D4_TRANSFORMS) / len(D4_TRANSFORMS)
    def fastunet():
        return transform_tta(prepared, x, lambda t: torch.softmax(t, 1), 'd4')
    torch.testing.assert_close(fastunet(), ttach_style(), rtol=1e-3, atol=1e-3)    # the same predictions
    rows = {name: bs / median_seconds(step, steps) for name, step in (('ttach-style loop, eval model', ttach_style),
                                                                        ('fastunet transform_tta, inference_model', fastunet))}
    return dict(encoder=encoder, size=size, bs=bs, threads=threads, images_per_s=rows)


def table(result: dict) -> str:
    rows = result['images_per_s']
    reference = rows['ttach-style loop, eval model']
    lines = [f"**D4 TTA** ({result['encoder']} U-Net, {result['size']}², batch {result['bs']}, {result['threads']} threads, 8 forward passes per batch)",
             '', '| predictor | images/s | vs ttach-style |', '|---|---|---|']
    lines += [f'| {name} | {value:.2f} | {value / reference:.2f}× |' for name, value in rows.items()]
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--encoder', default='resnet34')
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--bs', type=int, default=8)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    result = run(args.encoder, args.size, args.bs, args.steps, args.threads)
    results = Path(__file__).parent / 'results'
    (results / 'tta_speed.md').write_text(table(result) + '\n')
    (results / 'tta_speed.json').write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == '__main__':
    main()
