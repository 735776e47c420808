"""How long the data check before the first epoch takes on a large folder: 18,000 images of 101×101 with their masks
(the TGS salt competition's 4,000 training images and 18,000 test images are that size), read exactly as
`fastunet train` reads them.

    python tests/benchmarks/data_check.py [--n-images 18000] [--size 101] [--cache FOLDER]

The folder is generated once into a cache folder (about a minute) and reused; the check itself is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from fastunet.learner.dataset_check import check_datablock
from fastunet.learner.synthetic import make_synthetic_dataset
from fastunet.pipeline.data_folder import CLI_FIXES, list_images, segmentation_block


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n-images', type=int, default=18000)
    parser.add_argument('--size', type=int, default=101)
    parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'fastunet_data_check_bench'))
    args = parser.parse_args()
    folder = Path(args.cache) / f'{args.n_images}x{args.size}'
    if len(list((folder / 'images').glob('*.png'))) != args.n_images if (folder / 'images').exists() else True:
        start = time.time()
        make_synthetic_dataset(folder, n_images=args.n_images, size=(args.size, args.size), seed=0)
        print(f'generated {args.n_images} images in {time.time() - start:.0f} s')
    start = time.time()
    images = list_images(folder / 'images')
    items = pd.DataFrame({'item': [str(p) for p in images]})
    summary = check_datablock(segmentation_block(1), items, n_classes=2, fixes=CLI_FIXES)
    seconds = time.time() - start
    result = dict(n_images=len(images), size=args.size, seconds=round(seconds, 2), ms_per_image=round(1e3 * seconds / len(images), 3),
                  cpu_count=os.cpu_count(), sizes={f'{h}x{w}': n for (h, w), n in summary.sizes.items()})
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
