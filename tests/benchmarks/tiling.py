"""Tiled prediction against MONAI's `sliding_window_inference`, in one run, each case in a fresh subprocess.

Same model (the `inference_model` of a resnet10t U-Net, or for memory a one-convolution model whose cost is negligible),
same tile, overlap, tile batch and Gaussian blending, mirrored borders for both. fastunet reads the image from a
memory-mapped .npy file by windows and keeps one row of tiles; MONAI takes the whole image as a float tensor and returns
the whole probability map, as its users call it. Reported: megapixels/s and the peak resident memory above the
process's baseline (ru_maxrss after imports and model, which counts the pages of a memory-mapped file that were read:
the OS can drop those) and the peak anonymous memory above it (RssAnon, sampled: what the process allocated), against
the image's side. As `fastunet predict`, fastunet keeps a label map above 2²⁸ pixels in a memory-mapped file.

    python tests/benchmarks/tiling.py [--sides 2048 8192 20000] [--speed-side 2048] [--tile 256] [--overlap 0.25] [--tile-batch 8]
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


def rss_mib() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonymousPeak:
    "Peak anonymous memory (RssAnon: what the process allocated, not file pages it mapped), sampled every 20 ms on Linux."
    def __init__(self):
        import threading
        self.peak, self.running = 0.0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    @staticmethod
    def now() -> float:
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'): return int(line.split()[1]) / 1024
        return float('nan')

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, self.now())


def child(library: str, side: int, model_name: str, tile: int, overlap: float, tile_batch: int, threads: int, path: str) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    from fastunet.pipeline.inference import inference_model
    from fastunet.unet.model import MoreDynamicUnet
    torch.manual_seed(0)
    raw = torch.nn.Conv2d(3, 1, 3, padding=1) if model_name == 'conv' else MoreDynamicUnet('resnet10t', n_out=1, n_in=3, pretrained=False)
    fold_bn = model_name != 'conv'                    # both libraries run the same prepared model (`inference_model`)
    model = inference_model(raw.eval(), fold_bn=fold_bn)
    baseline, anonymous_baseline = rss_mib(), AnonymousPeak.now()
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    if library == 'fastunet':
        from fastunet.pipeline.tiling import predict_labels_tiled, tile_predictor
        predict = tile_predictor(raw, tta=False, activation='sigmoid', fold_bn=fold_bn)
        from fastunet.pipeline.prediction import LABELS_IN_MEMORY      # as `fastunet predict` does: a huge label map on disk
        labels_path = Path(path).with_suffix('.labels.npy') if side * side > LABELS_IN_MEMORY else None
        labels = predict_labels_tiled(predict, path, tile=tile, overlap=overlap, tile_batch=tile_batch, n_channels=3, path=labels_path)
    else:
        from monai.inferers import sliding_window_inference
        image = torch.from_numpy(np.load(path)).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            probabilities = sliding_window_inference(image, (tile, tile), tile_batch, lambda x: torch.sigmoid(model(x)), overlap=overlap,
                                                     mode='gaussian', padding_mode='reflect')
        labels = (probabilities[0, 0] > 0.5).numpy()
    seconds = time.perf_counter() - start
    return dict(library=library, side=side, model=model_name, seconds=seconds, megapixels_per_s=side * side / seconds / 1e6,
                peak_rss_above_baseline_mib=rss_mib() - baseline, peak_anonymous_above_baseline_mib=anonymous.stop() - anonymous_baseline,
                foreground=float(labels.mean()))


def run_case(library, side, model, args, folder: Path) -> dict:
    import numpy as np
    path = folder / f'{side}.npy'
    if not path.exists():
        image = np.lib.format.open_memmap(path, 'w+', np.uint8, (side, side, 3))
        rng = np.random.default_rng(0)
        for top in range(0, side, 1024): image[top:top + 1024] = rng.integers(0, 256, image[top:top + 1024].shape, dtype=np.uint8)
        image.flush(); del image
    out = subprocess.run([sys.executable, __file__, '--child', library, str(side), model, str(args.tile), str(args.overlap),
                          str(args.tile_batch), str(args.threads), str(path)], capture_output=True, text=True)
    if out.returncode: raise RuntimeError(f'{library} at {side}² failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(sides=(2048, 8192, 20000), speed_side: int = 2048, tile: int = 256, overlap: float = 0.25, tile_batch: int = 8,
        threads: int = 2) -> dict:
    "Every case in a fresh subprocess: the resnet10t U-Net at `speed_side`², then the one-convolution model at each side."
    settings = argparse.Namespace(tile=tile, overlap=overlap, tile_batch=tile_batch, threads=threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix='fastunet_tiling_bench_') as folder:
        for library in ('fastunet', 'monai'): rows.append(run_case(library, speed_side, 'resnet10t', settings, Path(folder)))
        for side in sides:
            for library in ('fastunet', 'monai'): rows.append(run_case(library, side, 'conv', settings, Path(folder)))
    return dict(sides=list(sides), speed_side=speed_side, tile=tile, overlap=overlap, tile_batch=tile_batch, threads=threads, rows=rows)


def table(result: dict) -> str:
    rows = result['rows']
    speed = {r['library']: r for r in rows if r['model'] == 'resnet10t'}
    lines = [f"**Tiled prediction against MONAI's `sliding_window_inference`**: tiles {result['tile']}, overlap {result['overlap']}, "
             f"batch {result['tile_batch']}, Gaussian, {result['threads']} threads", '',
             '| model | image | fastunet MP/s | MONAI MP/s | ratio |', '|---|---|---|---|---|',
             f"| resnet10t U-Net | {result['speed_side']}² RGB | {speed['fastunet']['megapixels_per_s']:.3f} | "
             f"{speed['monai']['megapixels_per_s']:.3f} | {speed['fastunet']['megapixels_per_s'] / speed['monai']['megapixels_per_s']:.2f}× |",
             '', 'Memory against image size (a one-convolution model, so that tiling and blending dominate):', '',
             '| image (RGB) | fastunet peak allocated (MiB) | MONAI peak allocated (MiB) | fastunet peak RSS incl. mapped file (MiB) '
             '| MONAI peak RSS (MiB) | fastunet MP/s | MONAI MP/s |', '|---|---|---|---|---|---|---|']
    for side in result['sides']:
        f, m = (next(r for r in rows if r['model'] == 'conv' and r['side'] == side and r['library'] == lib) for lib in ('fastunet', 'monai'))
        lines.append(f"| {side}² | {f['peak_anonymous_above_baseline_mib']:.0f} | {m['peak_anonymous_above_baseline_mib']:.0f} | "
                     f"{f['peak_rss_above_baseline_mib']:.0f} | {m['peak_rss_above_baseline_mib']:.0f} | "
                     f"{f['megapixels_per_s']:.2f} | {m['megapixels_per_s']:.2f} |")
    return '\n'.join(lines)


def save(result: dict) -> None:
    "results/tiling.md (which the README includes) and results/tiling.json."
    results = Path(__file__).parent / 'results'
    (results / 'tiling.md').write_text(table(result) + '\n')
    (results / 'tiling.json').write_text(json.dumps(result, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sides', type=int, nargs='*', default=[2048, 8192, 20000])
    parser.add_argument('--speed-side', type=int, default=2048)
    parser.add_argument('--tile', type=int, default=256)
    parser.add_argument('--overlap', type=float, default=0.25)
    parser.add_argument('--tile-batch', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--child', nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        library, side, model, tile, overlap, tile_batch, threads, path = args.child
        print(json.dumps(child(library, int(side), model, int(tile), float(overlap), int(tile_batch), int(threads), path)))
        return
    result = run(args.sides, args.speed_side, args.tile, args.overlap, args.tile_batch, args.threads)
    save(result)
    print(table(result))


if __name__ == '__main__':
    main()
