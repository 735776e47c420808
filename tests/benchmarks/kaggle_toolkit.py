"""Issue 15, part 6: what each tool of the Kaggle toolkit gains or loses here. The same k-fold run (5 folds, same
epochs, same seed) is trained with each of deep supervision, the empty-mask classifier and weight EMA turned on alone;
every fold's model then predicts its own held-out images without TTA, with flip TTA and with D4
TTA (the TTA rows use the baseline's folds). Scores are out-of-fold:

- salt-like (generated, 40% empty masks, 101×101): the TGS metric after the threshold search `fastunet train` does
  (pixel threshold and minimum area; with the classifier, its image-level threshold too);
- ISBI 2012 (30 EM images, 512×512, trained on random 128² crops, predicted whole): cell IoU pooled over the images at
  threshold 0.5, the classifier's gate at 0.5 (no image is empty there).

    python tests/benchmarks/kaggle_toolkit.py [--datasets salt isbi --seeds 0 1 --folds 5 --epochs N --n-images 100]
        [--variants baseline 'EMA 0.999' --merge]

Writes results/kaggle_toolkit.json and results/kaggle_toolkit.md (the README includes the table). With --merge, rows
already in kaggle_toolkit.json for other (data set, seed, variant) stay, so a run can add what an earlier one left out;
they must have been run with the same folds, epochs, architecture and number of images.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).parent
ISBI = HERE.resolve().parents[2] / 'shared' / 'data' / 'isbi2012'
VARIANTS = {'baseline': {}, 'deep supervision': dict(deep_supervision=True), 'empty-mask classifier': dict(classifier=True),
            'EMA 0.999': dict(ema=0.999)}
TTAS = ('none', 'hflip', 'd4')
DATASETS = {   # how each data set is trained: the CLI's arguments (ISBI's epochs are 24 crops each: more of them)
    'salt': dict(mask_folder='masks', binary_masks=False, crop=None, lr=3e-3, bs=8, epochs=8),
    'isbi': dict(mask_folder='labels', binary_masks=True, crop=128, lr=3e-3, bs=4, epochs=15),
}


def held_out_predictions(workdir: Path, mask_folder: str, binary: bool, ttas: tuple[str, ...], classifier: bool) -> dict:
    "Every fold's model on its own held-out images, whole: probabilities per TTA, the classifier's probabilities, truths."
    from fastunet.learner.data import MaskFromFolder, image_array
    from fastunet.pipeline.ensemble import FoldEnsemble
    from fastunet.pipeline.records import load_fold_records
    df = pd.read_csv(workdir / 'folds.csv')
    data = Path(json.loads((workdir / 'models' / 'run.json').read_text())['definition']['data'])
    items = [data / item for item in df['item']]
    mask_of = MaskFromFolder(mask_folder, binary=binary)
    probs = {tta: [None] * len(items) for tta in ttas}
    nonempty = [None] * len(items)
    for record in load_fold_records(workdir / 'models'):
        single = FoldEnsemble.from_dir(workdir / 'models', folds=[record['fold']], device='cpu', classifier_threshold=0.)   # ungated: the search gates
        held_out = [items[i] for i in record['valid_index']]
        for tta in ttas:
            for i, p in zip(record['valid_index'], single.predict(held_out, bs=4, tta=tta, progress=False)[:, -1]): probs[tta][i] = p
        if classifier:
            for i, path in zip(record['valid_index'], held_out):
                image = torch.from_numpy(np.array(image_array(path, 1))).permute(2, 0, 1)[None]
                nonempty[i] = single.nonempty_probabilities(image)[0].item()
    truths = torch.stack([torch.from_numpy(mask_of.array(p)) > 0 for p in items])
    return dict(probs={tta: torch.stack(p) for tta, p in probs.items()}, truths=truths,
                nonempty=torch.tensor(nonempty) if classifier else None)


def score(dataset: str, probs: torch.Tensor, truths: torch.Tensor, nonempty: torch.Tensor | None) -> dict:
    "The data set's out-of-fold score: the TGS metric after the threshold search (salt), cell IoU at 0.5 (ISBI)."
    from fastunet.learner.metrics import tgs_scores
    from fastunet.pipeline.submission import apply_threshold, search_threshold
    if dataset == 'salt':
        found = search_threshold(probs, truths, tgs_scores, min_areas=(0, 10, 25, 50), nonempty=nonempty)
        chosen = dict(zip(('threshold', 'min_area', 'classifier_threshold'), found[:-1]))
        return dict(score=found[-1], **chosen)
    masks = apply_threshold(probs, 0.5, 0, nonempty, 0.5 if nonempty is not None else 0.)
    return dict(score=((masks & truths).sum() / (masks | truths).sum()).item())


def run_dataset(dataset: str, seeds: list[int], folds: int, epochs: int | None, arch: str, n_images: int, workdir: Path,
                variants: list[str]) -> list[dict]:
    from fastunet.learner.synthetic import make_synthetic_dataset
    from fastunet.pipeline.workflow import run_training
    options = DATASETS[dataset]
    epochs = epochs or options['epochs']
    rows = []
    for seed in seeds:
        data = (make_synthetic_dataset(workdir / f'salt_data_{seed}', n_images=n_images, size=(101, 101), seed=seed, empty_fraction=0.4)
                if dataset == 'salt' else ISBI)
        for variant in variants:
            heads = VARIANTS[variant]
            out = workdir / f'{dataset}_{seed}_{variant.replace(" ", "_")}'
            start = time.time()
            run_training(data, out, arch=arch, n_folds=folds, epochs=epochs, lr=options['lr'], bs=options['bs'], seed=seed,
                         mask_folder=options['mask_folder'], binary_masks=options['binary_masks'], crop=options['crop'], **heads)
            seconds = time.time() - start
            ttas = TTAS if variant == 'baseline' else ('none',)
            predicted = held_out_predictions(out, options['mask_folder'], options['binary_masks'], ttas, heads.get('classifier', False))
            for tta in ttas:
                row = dict(dataset=dataset, seed=seed, variant=variant, tta=tta, epochs=epochs, train_seconds=round(seconds, 1),
                           **score(dataset, predicted['probs'][tta], predicted['truths'], predicted['nonempty']))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict], settings: dict) -> str:
    "Markdown: one line per variant and TTA, the mean over seeds per data set and its change from the baseline."
    frame = pd.DataFrame(rows)
    lines = ['| variant | TTA | ' + ' | '.join(f"{d}: {'OOF TGS' if d == 'salt' else 'OOF cell IoU'} (Δ)" for d in settings['datasets']) + ' |',
             '|---|---|' + '---|' * len(settings['datasets'])]
    order = [(v, t) for v in VARIANTS for t in TTAS if ((frame.variant == v) & (frame.tta == t)).any()]
    for variant, tta in order:
        cells = []
        for dataset in settings['datasets']:
            rows_here = frame[(frame.dataset == dataset) & (frame.variant == variant) & (frame.tta == tta)]
            here = rows_here.score
            # the baseline over the same seeds: a delta never compares one seed's variant with another seed's baseline
            base = frame[(frame.dataset == dataset) & (frame.variant == 'baseline') & (frame.tta == 'none') & frame.seed.isin(rows_here.seed)].score
            if here.empty: cells.append('–'); continue
            delta = here.mean() - base.mean()
            per_seed = ''
            if len(rows_here) > 1:     # each seed's own change: the spread the mean hides
                baseline_by_seed = frame[(frame.dataset == dataset) & (frame.variant == 'baseline') & (frame.tta == 'none')].set_index('seed').score
                per_seed = '; seeds ' + ', '.join(f'{r.score - baseline_by_seed[r.seed]:+.3f}' for r in rows_here.itertuples())
            cells.append(f'{here.mean():.4f} ({delta:+.4f}{per_seed})' if (variant, tta) != ('baseline', 'none') else
                         f'{here.mean():.4f}' + (f" (seeds {', '.join(f'{v:.3f}' for v in here)})" if len(here) > 1 else ''))
        lines.append(f'| {variant} | {tta} | ' + ' | '.join(cells) + ' |')
    seeds = frame.groupby('dataset').seed.nunique().to_dict()
    lines.append('')
    epochs = frame.groupby('dataset').epochs.first().to_dict()
    lines.append(f"{settings['folds']} folds of `{settings['arch']}` from scratch, one-cycle ("
                 f"{', '.join(f'{d}: {n} epochs' for d, n in epochs.items())}, the same for every variant), on "
                 f"this machine's CPU; mean over the seeds a row has, up to {', '.join(f'{n} for {d}' for d, n in seeds.items())} (each seed: its "
                 f"own folds, and for salt its own generated data set of {settings['n_images']} images). Δ: change from the "
                 f"baseline without TTA on the same seeds" + ("; where a row has several seeds, each seed's own Δ follows." if max(seeds.values()) > 1 else
                                             ". One seed: how much another seed would move these figures was not measured."))
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--datasets', nargs='+', default=['salt', 'isbi'], choices=list(DATASETS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    parser.add_argument('--folds', type=int, default=5)
    parser.add_argument('--epochs', type=int, default=None, help="one-cycle epochs per fold (default: salt 8, ISBI 15)")
    parser.add_argument('--arch', default='resnet10t')
    parser.add_argument('--n-images', type=int, default=100, help='salt-like images per seed')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--workdir', default=None, help='keep the runs here (default: a temporary folder)')
    parser.add_argument('--results', default=str(HERE / 'results'))
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--merge', action='store_true', help='keep the rows of kaggle_toolkit.json this run does not redo')
    args = parser.parse_args()
    if 'isbi' in args.datasets and not ISBI.exists(): raise SystemExit(f'ISBI 2012 data not found at {ISBI}')
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='fastunet_toolkit_'))
    settings = dict(datasets=args.datasets, folds=args.folds, epochs=args.epochs, arch=args.arch, n_images=args.n_images)
    results = Path(args.results)
    rows = []
    if args.merge:
        if not (results / 'kaggle_toolkit.json').exists(): raise SystemExit(f"--merge: no earlier results in {results}: run without --merge")
        earlier = json.loads((results / 'kaggle_toolkit.json').read_text())
        different = {k: (v, settings[k]) for k, v in earlier['settings'].items() if k != 'datasets' and v != settings[k]}
        if different: raise SystemExit(f'--merge: kaggle_toolkit.json was run with other settings (theirs, these): {different}')
        redone = {(d, s, v) for d in args.datasets for s in (args.seeds if d == 'salt' else args.seeds[:1]) for v in args.variants}
        rows = [r for r in earlier['rows'] if (r['dataset'], r['seed'], r['variant']) not in redone]
        settings['datasets'] = [d for d in DATASETS if d in set(earlier['settings']['datasets']) | set(args.datasets)]
    for dataset in args.datasets:
        seeds = args.seeds if dataset == 'salt' else args.seeds[:1]      # ISBI: one seed (its 30 images take most of the time)
        rows += run_dataset(dataset, seeds, args.folds, args.epochs, args.arch, args.n_images, workdir, args.variants)
    markdown = table(rows, settings)
    print(markdown)
    results.mkdir(parents=True, exist_ok=True)
    (results / 'kaggle_toolkit.json').write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
    (results / 'kaggle_toolkit.md').write_text(markdown + '\n')


if __name__ == '__main__':
    main()
