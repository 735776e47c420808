"""Bad input and stale state, as a hostile but realistic user meets them (issue 12): every case either gets a clear
error that names the argument or file and the fix, before any training, or gives the correct result. Tables of cases,
tiny models (resnet10t) and images (32-48 px), so the whole battery takes about a minute."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torchvision.models as tvm
from PIL import Image

from conftest import run_cli
from fastunet.learner.synthetic import make_synthetic_dataset
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.records import fold_paths, read_run
from fastunet.pipeline.submission import rle_decode, rle_encode
from fastunet.pipeline.splits import make_folds
from fastunet.pipeline.training import train_folds
from fastunet.pipeline.data_folder import segmentation_block
from fastunet.pipeline.prediction import run_prediction
from fastunet.pipeline.workflow import run_training
from fastunet.learner.data import MaskFromFolder
from fastunet.learner.losses import BCELovaszLoss
from fastai.data.block import DataBlock
from fastai.data.core import Pipeline
from fastai.data.transforms import ColReader
from fastai.vision.augment import Resize, ResizeMethod
from fastai.vision.core import PILImageBW
from fastai.vision.data import ImageBlock, MaskBlock
from fastunet.unet.model import MoreDynamicUnet

TRAIN = dict(arch='resnet10t', n_folds=2, epochs=1, lr=3e-3, bs=2, seed=0)


def copy_data(data_factory, tmp_path, n_images: int = 8, size=(32, 32)) -> Path:
    "A private copy of a small generated set, free to damage."
    return Path(shutil.copytree(data_factory(1, 2, size=size, n_images=n_images), tmp_path / 'data'))


def masks_of(data: Path) -> list[Path]: return sorted((data / 'masks').glob('*.png'))


def images_of(data: Path) -> list[Path]: return sorted((data / 'images').glob('*.png'))


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    "One finished two-fold run on 8 images of 32², and a few test images; tests copy it before they change it."
    work = tmp_path_factory.mktemp('trained')
    data = make_synthetic_dataset(work / 'data', n_images=8, size=(32, 32), seed=3)
    run_training(data, work / 'run', **TRAIN)
    test = make_synthetic_dataset(work / 'test', n_images=3, size=(32, 32), seed=4)
    return data, work / 'run', images_of(test)


def copy_run(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run[1], tmp_path / 'run'))


# ---------------------------------------------------------------- arguments, refused before any work (cases 5 and 8)

@pytest.mark.parametrize('argv, message', [
    (['--epochs', '0'], '--epochs must be a whole number ≥ 1, not 0'),
    (['--lr', '-1'], '--lr must be a positive, finite learning rate'),
    (['--lr', 'inf'], '--lr must be a positive, finite learning rate (e.g. 1e-3), not inf'),
    (['--lr', 'nan'], '--lr must be a positive, finite learning rate (e.g. 1e-3), not nan'),
    (['--seed', '-1'], '--seed must be a whole number ≥ 0, not -1'),
    (['--bs', '0'], '--bs must be a whole number ≥ 1, not 0'),
    (['--crop', '-5'], '--crop must be a whole number ≥ 1, not -5'),
    (['--fold', '7', '--folds', '5'], '--fold 7 is not one of the 5 folds 0..4'),
    (['--folds', '1'], '--folds must be a whole number ≥ 2'),
    (['--crop', '16', '--resize', '16'], 'give --crop or --resize, not both'),
    (['--classes', '3', '--binary-masks'], '--binary-masks reads masks as background and foreground'),
    (['--restart', '--fold', '0'], '--restart deletes every fold of the run'),
    (['--crop', '64'], 'the crop 64 is larger than the smallest image'),
    (['--folds', '9'], 'too few for 9 folds'),
    (['--ema', '1'], '--ema must be a decay strictly between 0 and 1'),
    (['--ema', '-0.5'], '--ema must be a decay strictly between 0 and 1'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_bad_training_arguments_are_refused_before_anything_is_written(data_factory, tmp_path, capsys, argv, message):
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--arch', 'resnet10t', *argv], capsys)
    assert code == 1 and message in err, err
    assert 'Traceback' not in err
    assert not (tmp_path / 'run' / 'models').exists()


@pytest.mark.parametrize('argv, message', [
    (['--threshold', '1.5'], '--threshold must be a probability in [0, 1], not 1.5'),
    (['--min-area', '-1'], '--min-area must be a whole number ≥ 0'),
    (['--bs', '0'], '--bs must be a whole number ≥ 1'),
    (['--folds', '0,x'], "--folds takes fold numbers separated by commas"),
    (['--folds', '0,5'], 'fold(s) [5] are not folds of the run'),
    (['--workers', '-1'], '--workers must be a whole number ≥ 0'),
    (['--tile', '64', '--overlap', '1.0'], 'overlap 1.0 as a fraction of the tile must be at least 0 and below 1'),
    (['--tile', '64', '--overlap', '64'], 'overlap of 64 pixels must be at least 0 and below the tile (64 px)'),
    (['--tile', '64', '--overlap', 'half'], '--overlap must be a fraction of the tile (e.g. 0.25) or pixels'),
    (['--tile', '8'], '--tile must be a whole number ≥ 16'),
    (['--tile', '64', '--tile-batch', '0'], '--tile-batch must be a whole number ≥ 1'),
    (['--tile', '64', '--blend', 'pyramid'], "--blend must be one of ('gaussian', 'constant')"),
    (['--overlap', '0.5'], '--overlap, --tile-batch and --blend set how tiles are predicted: pass --tile too'),
    (['--tta', 'rotate'], "tta must be one of ['none', 'hflip', 'vflip', 'flips', 'd4']"),
    (['--tta-scales', '0.75,x'], '--tta-scales takes factors separated by commas'),
    (['--tta-scales', '0,1'], 'scales are positive factors'),
    (['--tta-merge', 'median'], "merge must be 'mean' or 'gmean'"),
    (['--tta-pass-pixels', '0'], '--tta-pass-pixels: pass_pixels is the most pixels (images × height × width) one forward pass takes'),
    (['--classifier-threshold', '1.5'], '--classifier-threshold must be a probability in [0, 1], not 1.5'),
    (['--classifier-threshold', '0.5'], '--classifier-threshold applies to folds trained with an empty-mask classifier (--classifier)'),
    (['--wide'], '--wide writes a column per class, and this model has one (binary)'),
    (['--header', 'ImageId'], "--header names 1 column(s), ['ImageId'], but the rows have 2"),
])
def test_bad_prediction_arguments_are_refused(trained_run, tmp_path, capsys, argv, message):
    _, run, test_images = trained_run
    code, err = run_cli(['predict', str(run / 'models'), str(test_images[0].parent), '--out', str(tmp_path / 's.csv'), *argv], capsys)
    assert code == 1 and message in err, err
    assert not (tmp_path / 's.csv').exists()


def test_prediction_names_a_file_that_is_not_an_image_and_an_out_that_is_a_folder(trained_run, tmp_path, capsys):
    _, run, test_images = trained_run
    folder = Path(shutil.copytree(test_images[0].parent, tmp_path / 'test'))
    code, err = run_cli(['predict', str(run / 'models'), str(folder), '--out', str(tmp_path)], capsys)
    assert code == 1 and f"--out '{tmp_path}' is a folder" in err, err
    (folder / '0001.png').write_text('not an image')
    code, err = run_cli(['predict', str(run / 'models'), str(folder), '--out', str(tmp_path / 's.csv')], capsys)
    assert code == 1 and "0001.png' cannot be read as an image" in err and 'Traceback' not in err, err
    assert not (tmp_path / 's.csv').exists()


# ---------------------------------------------------------------- the data check, before the first epoch (cases 1 and 8)

def truncate(path: Path) -> None: path.write_bytes(path.read_bytes()[:60])


def damage_masks(data: Path, values) -> None:
    "Rewrite every mask through `values(mask) -> array` (0/255, 16-bit, ...)."
    for path in masks_of(data): Image.fromarray(values(np.array(Image.open(path)))).save(path)


DATA_CASES = {
    'truncated image': (lambda d: truncate(images_of(d)[2]), [], ['cannot be read', '0002.png', 'truncated']),
    'missing mask': (lambda d: masks_of(d)[1].unlink(), [], ['no mask for', '0001.png']),
    'mask of another size': (lambda d: Image.fromarray(np.zeros((30, 32), np.uint8)).save(masks_of(d)[3]), [],
                             ["0003.png' is 32×32, its mask 30×32"]),
    'mixed image sizes': (lambda d: [Image.fromarray(np.zeros((40, 40), np.uint8)).save(p) for p in (images_of(d)[0], masks_of(d)[0])],
                          [], ['2 different sizes', '40×40: 1 image(s)', '--resize S']),
    '0/255 masks without --binary-masks': (lambda d: damage_masks(d, lambda m: m * 255), [],
                                           ['outside the class codes 0..1 (255)', 'pass --binary-masks']),
    '16-bit 0/65535 masks': (lambda d: damage_masks(d, lambda m: m.astype(np.uint16) * 65535), [],
                             ['holds uint16 values from 0 to 65535', 'binary=True (--binary-masks)']),
    'class codes 0..2 with two classes': (lambda d: damage_masks(d, lambda m: m * 2), [], ['(2)', 'pass --classes 3']),
    'all masks empty': (lambda d: damage_masks(d, np.zeros_like), [], ['all 8 masks are empty']),
    'all masks empty as 0/255 read with --binary-masks': (lambda d: damage_masks(d, np.zeros_like), ['--binary-masks'],
                                                          ['all 8 masks are empty']),
    'not an image': (lambda d: images_of(d)[4].write_text('hello'), [], ['cannot be read', '0004.png', 'UnidentifiedImageError']),
    'the first file not an image': (lambda d: images_of(d)[0].write_text('hello'), [], ['cannot be read', '0000.png', 'UnidentifiedImageError']),
    'the first image truncated': (lambda d: truncate(images_of(d)[0]), [], ['cannot be read', '0000.png']),
    '16-bit images': (lambda d: [Image.fromarray(np.array(Image.open(p)).astype(np.uint16) * 16).save(p) for p in images_of(d)], [],
                      ['8 item(s) cannot be read', "0000.png' is an image of mode I;16", 'would clip every value above 255']),
    'all masks full (a white background) with --binary-masks': (lambda d: damage_masks(d, lambda m: np.full_like(m, 255)),
                                                                ['--binary-masks'], ['all 8 masks are foreground at every pixel']),
}


@pytest.mark.parametrize('case', DATA_CASES)
def test_data_that_cannot_train_is_refused_before_the_first_epoch(data_factory, tmp_path, capsys, case):
    damage, extra, expected = DATA_CASES[case]
    data = copy_data(data_factory, tmp_path)
    damage(data)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--arch', 'resnet10t', '--epochs', '1', '--bs', '2',
                         '--folds', '2', *extra], capsys)
    assert code == 1, err
    for text in expected: assert text in err, (text, err)
    assert not (tmp_path / 'run' / 'models').exists()          # refused before any run folder, let alone an epoch


@pytest.mark.parametrize('stored', ['0/1', '0/255', '16-bit 0/1', 'colour 0/1'])
def test_binary_masks_mean_any_nonzero_value_is_foreground(data_factory, tmp_path, stored):
    "Case 1: 0/1 masks under --binary-masks were read as empty (> 127) and scored TGS 1.0. Now every stored form trains."
    data = copy_data(data_factory, tmp_path)
    truth = [np.array(Image.open(p)) for p in masks_of(data)]
    convert = {'0/1': lambda m: m, '0/255': lambda m: m * 255, '16-bit 0/1': lambda m: m.astype(np.uint16),
               'colour 0/1': lambda m: np.stack([np.zeros_like(m), m, np.zeros_like(m)], -1)}[stored]
    damage_masks(data, convert)
    report = run_training(data, tmp_path / 'run', **{**TRAIN, 'epochs': 1}, binary_masks=True)
    assert 'oof_tgs' in report
    from fastunet.pipeline.records import out_of_fold   # the OOF truths the threshold was chosen on are the real masks
    from fastunet.learner.data import MaskFromFolder
    read = [MaskFromFolder(binary=True).array(p) for p in images_of(data)]
    for mask, expected in zip(read, truth): np.testing.assert_array_equal(mask, expected)
    assert out_of_fold(tmp_path / 'run' / 'models', 8).shape == (8, 1, 32, 32)


def test_mixed_sizes_train_with_resize_and_predict_at_each_image_size(data_factory, tmp_path):
    data = copy_data(data_factory, tmp_path)
    for path in (images_of(data)[0], masks_of(data)[0]):
        Image.fromarray(np.array(Image.open(path).resize((40, 36), Image.NEAREST))).save(path)
    report = run_training(data, tmp_path / 'run', **TRAIN, resize=32)
    assert len(report['cv']) == 2 and 'threshold' not in report      # no threshold on resized OOF predictions
    submission = run_prediction(tmp_path / 'run' / 'models', images_of(data)[:2], tmp_path / 's.csv')
    rows = [line.split(',') for line in submission.read_text().splitlines()[1:]]
    assert rle_decode(rows[0][1], (36, 40)).shape == (36, 40)          # an RLE that fits the image's own size
    assert read_run(tmp_path / 'run' / 'models')['definition']['resize'] == 32
    resize, = [t for t in segmentation_block(resize=32).item_tfms if isinstance(t, Resize)]   # squished, as prediction resizes
    assert isinstance(resize, Resize) and resize.method == ResizeMethod.Squish


def test_the_progress_bar_never_cuts_a_prediction_short(trained_run, tmp_path):
    "Images of two sizes make more batches than len(items) / bs: every image still gets its prediction."
    _, run, test_images = trained_run
    wide = tmp_path / 'wide.png'
    Image.open(test_images[0]).resize((48, 32)).save(wide)
    items = [test_images[0], wide, test_images[1], wide, test_images[2]]           # 5 batches of bs=4, not 2
    predictions = list(FoldEnsemble.from_dir(run / 'models', device='cpu').predict_iter(items, bs=4, progress=True))
    assert [item for item, _ in predictions] == items
    assert [tuple(probs.shape[-2:]) for _, probs in predictions] == [(32, 32), (32, 48), (32, 32), (32, 48), (32, 32)]


# ---------------------------------------------------------------- weights= that do not fit (case 2)

def classifier_state(arch) -> dict:
    "The state dict of the classification network an encoder comes from."
    return timm.create_model(arch).state_dict() if isinstance(arch, str) else arch(weights=None).state_dict()


WEIGHTS_CASES = {
    "a 'backbone.' prefix": (lambda arch: {f'backbone.{k}': v for k, v in classifier_state(arch).items()}, "prefix 'backbone.'"),
    "a 'module.' prefix (DataParallel)": (lambda arch: {f'module.{k}': v for k, v in classifier_state(arch).items()}, "prefix 'module.'"),
    "{'state_dict': {}}": (lambda arch: {'state_dict': {}}, 'holds no tensors'),
    'an empty dict': (lambda arch: {}, 'holds no tensors'),
    'a fold file': (lambda arch: MoreDynamicUnet(arch, n_out=1, n_in=3, pretrained=False).state_dict(), "prefix 'encoder."),
    'another architecture': (lambda arch: timm.create_model('mobilenetv3_small_050').state_dict(), ('do not fit', 'could not load weights')),
}


@pytest.mark.parametrize('case', WEIGHTS_CASES)
@pytest.mark.parametrize('arch', ['resnet10t', tvm.resnet18], ids=['timm', 'torchvision'])
def test_weights_that_do_not_fit_are_refused(tmp_path, case, arch):
    "Case 2: such files loaded nothing, silently, and the random encoder was then frozen as if pretrained."
    make, message = WEIGHTS_CASES[case]
    torch.save(make(arch), tmp_path / 'w.pth')
    with pytest.raises(ValueError) as error: MoreDynamicUnet(arch, n_out=1, n_in=3, weights=tmp_path / 'w.pth')
    assert any(text in str(error.value) for text in ([message] if isinstance(message, str) else message)), str(error.value)


def test_weights_with_the_prefix_stripped_load(tmp_path):
    "The fix the message names works, and the loaded encoder holds the file's values."
    source = classifier_state("resnet10t")
    torch.save({k.removeprefix('backbone.'): v for k, v in {f'backbone.{k}': v for k, v in source.items()}.items()}, tmp_path / 'w.pth')
    model = MoreDynamicUnet('resnet10t', n_out=1, n_in=3, weights=tmp_path / 'w.pth')
    torch.testing.assert_close(model.encoder.model.state_dict()['layer4.0.conv2.weight'], source['layer4.0.conv2.weight'])
    gray = MoreDynamicUnet('resnet10t', n_out=1, n_in=1, weights=tmp_path / 'w.pth')     # the stem adapted, the rest loaded
    torch.testing.assert_close(gray.encoder.model.state_dict()['layer4.0.conv2.weight'], source['layer4.0.conv2.weight'])


# ---------------------------------------------------------------- the run folder knows its run (cases 3 and 4)

@pytest.mark.parametrize('change, what', [
    (dict(arch='resnet18d'), "arch 'resnet10t' then, 'resnet18d' now"),
    (dict(n_folds=3), 'folds [0, 1] then, [0, 1, 2] now'),
    (dict(epochs=2), 'epochs 1 then, 2 now'),
    (dict(seed=1), 'seed 0 then, 1 now'),
    (dict(binary_masks=True), 'binary_masks False then, True now'),
])
def test_a_rerun_with_other_arguments_stops_and_says_what_changed(trained_run, tmp_path, change, what):
    data, _, _ = trained_run
    out = tmp_path
    copy_run(trained_run, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (out / 'run' / 'models').iterdir()}
    with pytest.raises(ValueError) as error: run_training(data, out / 'run', **{**TRAIN, **change})
    assert what in str(error.value) and '--restart' in str(error.value) and 'another --out' in str(error.value)
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'run' / 'models').iterdir()} == before      # nothing touched


def test_another_data_folder_is_another_run(trained_run, tmp_path):
    data, _, _ = trained_run
    copy_run(trained_run, tmp_path)
    moved = Path(shutil.copytree(data, tmp_path / 'elsewhere'))
    with pytest.raises(ValueError, match=re.escape(f"data '{data}' then, '{moved}' now")):
        run_training(moved, tmp_path / 'run', **TRAIN)


def test_resume_from_another_working_directory_is_the_same_run(trained_run, tmp_path, monkeypatch):
    data, _, _ = trained_run
    run = copy_run(trained_run, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / 'models').glob('fold_*')}
    monkeypatch.chdir(data.parent)
    report = run_training(Path(data.name), run, **TRAIN)                   # a relative path, from another directory
    assert len(report['cv']) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (run / 'models').glob('fold_*')} == stamps     # nothing retrained


@pytest.mark.parametrize('damage', ['truncated weights', 'truncated OOF', 'missing record', 'record of another run', 'score -inf'])
def test_a_damaged_fold_is_trained_again(trained_run, tmp_path, capsys, damage):
    data, _, _ = trained_run
    run = copy_run(trained_run, tmp_path)
    paths = fold_paths(run / 'models', 1)
    record = json.loads(paths['record'].read_text())
    if damage == 'truncated weights': truncate(paths['weights'])
    elif damage == 'truncated OOF': truncate(paths['oof'])
    elif damage == 'missing record': paths['record'].unlink()
    elif damage == 'record of another run': paths['record'].write_text(json.dumps({**record, 'run_id': 'another'}))
    else: paths['record'].write_text(json.dumps({**record, 'score': -math.inf}))
    untouched = fold_paths(run / 'models', 0)['weights'].stat().st_mtime_ns
    run_training(data, run, **TRAIN)
    assert 'fold 1 is trained again' in capsys.readouterr().out
    assert fold_paths(run / 'models', 0)['weights'].stat().st_mtime_ns == untouched
    retrained = json.loads(paths['record'].read_text())
    assert retrained['run_id'] == record['run_id'] and math.isfinite(retrained['score'])
    assert retrained['history'] == record['history']                     # the same seed: the same losses
    FoldEnsemble.from_dir(run / 'models', device='cpu')                  # and the run is whole again


def test_restart_replaces_the_run(trained_run, tmp_path):
    data, _, _ = trained_run
    run = copy_run(trained_run, tmp_path)
    (run / 'notes.txt').write_text('mine')
    shutil.copy(fold_paths(run / 'models', 0)['weights'], run / 'models' / 'fold_0_good_backup.pth')
    report = run_training(data, run, **{**TRAIN, 'arch': 'resnet18d'}, restart=True)
    assert len(report['cv']) == 2 and json.loads(fold_paths(run / 'models', 0)['record'].read_text())['arch'] == 'resnet18d'
    assert (run / 'notes.txt').read_text() == 'mine'                    # only the run's own files were deleted
    assert (run / 'models' / 'fold_0_good_backup.pth').exists()


def nan_loss(pred, target): return pred.float().mean() * float('nan')


def test_a_diverged_fold_is_refused_not_kept_and_a_corrected_rerun_needs_no_restart(data_factory, tmp_path):
    "Case: NaN losses at every epoch kept a fold whose score was NaN; a rerun with a lower lr then met 'other arguments'."
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    images = [str(p) for p in images_of(data)]
    dblock = segmentation_block(1, binary_masks=True)
    df = make_folds(images, n_folds=2, seed=0)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with pytest.raises(ValueError, match=r"fold 0 diverged: valid_loss was \[nan\] by epoch, never a number.*lr=0.003"):
            train_folds(dblock, df, 'resnet10t', tmp_path, epochs=1, lr=3e-3, bs=2, seed=0, dls_kwargs=dict(num_workers=0),
                        learner_kwargs=dict(n_out=1, pretrained=False, loss_func=nan_loss))
        assert torch.backends.cudnn.benchmark                             # a fold's deterministic settings do not outlive it
    finally: torch.backends.cudnn.benchmark = benchmark
    assert not list(tmp_path.glob('fold_*')) and read_run(tmp_path) is not None
    cv = train_folds(dblock, df, 'resnet10t', tmp_path, epochs=1, lr=3e-3, bs=2, seed=0, dls_kwargs=dict(num_workers=0),
                     learner_kwargs=dict(n_out=1, pretrained=False, loss_func=BCELovaszLoss()))     # no restart needed
    assert len(cv) == 2 and cv.score.map(math.isfinite).all()


def test_class_codes_are_checked_against_n_out_when_the_mask_block_has_no_codes(data_factory, tmp_path):
    "MaskBlock() without codes and a 3-class model: codes 0..2 are right, not refused as 'outside 0..1'."
    data = data_factory(1, 3, size=(32, 32), n_images=8)
    dblock = DataBlock(blocks=(ImageBlock(PILImageBW), MaskBlock()), get_x=ColReader('item'),
                       get_y=Pipeline([ColReader('item'), MaskFromFolder()]))
    df = make_folds([str(p) for p in images_of(data)], n_folds=2, seed=0)
    cv = train_folds(dblock, df, 'resnet10t', tmp_path, epochs=1, bs=2, seed=0, folds=[0], dls_kwargs=dict(num_workers=0),
                     learner_kwargs=dict(n_out=3, pretrained=False))
    assert len(cv) == 1
    with pytest.raises(ValueError, match='outside the class codes 0..1'):                # and a binary model is refused them
        train_folds(dblock, df, 'resnet10t', tmp_path / 'binary', epochs=1, bs=2, learner_kwargs=dict(n_out=1, pretrained=False))


def test_folds_from_before_run_records_are_not_taken_for_this_run(trained_run, tmp_path):
    data, _, _ = trained_run
    run = copy_run(trained_run, tmp_path)
    (run / 'models' / 'run.json').unlink()
    with pytest.raises(ValueError, match='holds folds but no run record'): run_training(data, run, **TRAIN)


@pytest.mark.parametrize('damage, message', [
    ('missing fold record', r"fold\(s\) \[1\] of the run .* are not finished .*--folds 0"),
    ('a fold of another run', 'written by another run'),
    ('missing weights', 'has a record but no weights'),
    ('truncated weights', 'do not load into fold 1'),
])
def test_the_ensemble_refuses_an_incomplete_or_mixed_run(trained_run, tmp_path, damage, message):
    run = copy_run(trained_run, tmp_path) / 'models'
    paths = fold_paths(run, 1)
    if damage == 'missing fold record': paths['record'].unlink()
    elif damage == 'a fold of another run':              # fold 2 of a 3-fold run, copied among these 2
        record = json.loads(fold_paths(run, 0)['record'].read_text())
        fold_paths(run, 2)['record'].write_text(json.dumps({**record, 'fold': 2, 'n_folds': 3, 'run_id': 'another'}))
        shutil.copy(fold_paths(run, 0)['weights'], fold_paths(run, 2)['weights'])
    elif damage == 'missing weights': paths['weights'].unlink()
    else: truncate(paths['weights'])
    with pytest.raises(ValueError if damage != 'missing weights' else FileNotFoundError, match=message):
        FoldEnsemble.from_dir(run, device='cpu')


def test_the_finished_folds_can_be_ensembled_on_request(trained_run, tmp_path, capsys):
    _, run, test_images = trained_run
    run = copy_run(trained_run, tmp_path)
    fold_paths(run / 'models', 1)['record'].unlink()
    code, err = run_cli(['predict', str(run / 'models'), str(test_images[0].parent), '--out', str(tmp_path / 's.csv'), '--folds', '0'], capsys)
    assert code == 0, err
    assert len((tmp_path / 's.csv').read_text().splitlines()) == 1 + len(test_images)


@pytest.mark.parametrize('content, message', [('', 'is damaged'), ('{"threshold": 0.4}', 'is damaged'),
                                              ('{"threshold": 0.4, "min_area": 0, "run_id": "another"}', 'chosen for another run')])
def test_a_damaged_or_stale_threshold_file_is_named(trained_run, tmp_path, content, message):
    _, _, test_images = trained_run
    run = copy_run(trained_run, tmp_path)
    (run / 'models' / 'threshold.json').write_text(content)
    with pytest.raises(ValueError, match=message): run_prediction(run / 'models', test_images, tmp_path / 's.csv')


def test_a_truncated_oof_file_is_named(trained_run, tmp_path):
    from fastunet.pipeline.records import out_of_fold
    run = copy_run(trained_run, tmp_path)
    truncate(fold_paths(run / 'models', 0)['oof'])
    with pytest.raises(ValueError, match=r"fold_0_oof.npy' cannot be read .* retrain fold 0"): out_of_fold(run / 'models', 8)


# ---------------------------------------------------------------- submissions (case 6)

def test_two_images_with_one_id_are_refused(trained_run, tmp_path, capsys):
    _, run, test_images = trained_run
    folder = Path(shutil.copytree(test_images[0].parent, tmp_path / 'test'))
    Image.open(folder / test_images[0].name).convert('L').save(folder / (test_images[0].stem + '.jpg'))
    code, err = run_cli(['predict', str(run / 'models'), str(folder), '--out', str(tmp_path / 's.csv')], capsys)
    assert code == 1 and "belong to more than one image, e.g. [['0000.jpg', '0000.png']]" in err, err


@pytest.mark.parametrize('mask, message', [
    (np.array([[0.3, 0.9]]), 'pass threshold='),
    (np.zeros((4, 4, 3), np.uint8), 'not an array of shape (4, 4, 3)'),
    (np.array([[0, 255]], np.uint8), 'mask > 0 for a 0/255 mask'),
    (np.zeros((2, 4, 4), bool), 'not an array of shape (2, 4, 4)'),
])
def test_rle_encode_refuses_what_is_not_one_binary_mask(mask, message):
    with pytest.raises(ValueError) as error: rle_encode(mask)
    assert message in str(error.value)


@pytest.mark.parametrize('cell', [float('nan'), None, '', pd.NA, np.float32('nan')])
def test_rle_decode_of_an_empty_cell_is_an_empty_mask(cell):
    assert rle_decode(cell, (3, 4)).sum() == 0


# ---------------------------------------------------------------- reproducible (case 7) and temporary files (case 9)

def test_the_same_command_twice_gives_the_same_losses(trained_run, tmp_path):
    data, first, _ = trained_run
    run_training(data, tmp_path / 'again', **TRAIN)
    for fold in (0, 1):
        one, two = (json.loads(fold_paths(run / 'models', fold)['record'].read_text()) for run in (first, tmp_path / 'again'))
        assert one['history'] == two['history'] and one['valid_index'] == two['valid_index']
        assert [set(epoch) for epoch in one['history']] == [{'train_loss', 'valid_loss', 'tgs_metric', 'iou'}] * TRAIN['epochs']


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(trained_run, tmp_path):
    "A process killed while writing leaves its temporary files; the next run in that folder removes them."
    data, _, test_images = trained_run
    run = copy_run(trained_run, tmp_path)
    script = ("import sys, time; from pathlib import Path; from fastunet.pipeline.files import atomic_write\n"
              "for p in sys.argv[1:]: atomic_write(p, lambda t: (Path(t).write_text('half'), print(t, flush=True), time.sleep(60)))")
    for target in (run / 'models' / 'fold_1.pth', tmp_path / 'submission.csv'):
        writer = subprocess.Popen([sys.executable, '-c', script, str(target)], stdout=subprocess.PIPE, text=True)
        temporary = Path(writer.stdout.readline().strip())
        writer.kill(); writer.wait()
        assert temporary.exists() and temporary.name.startswith(f'.{target.name}.')
    users = [run / '.report.v2.2024.draft_01.tmp', run / 'models' / '.notes.tmp']    # a user's files, however named, stay
    for path in users: path.write_text('mine'); os.utime(path, (0, 0))
    run_training(data, run, **TRAIN)                                     # resumes: nothing to train, but it cleans up
    assert all(path.exists() for path in users)
    for path in users: path.unlink()
    run_prediction(run / 'models', test_images, tmp_path / 'submission.csv')
    leftovers = [p.name for folder in (run, run / 'models', tmp_path) for p in folder.glob('.*.tmp')]
    assert leftovers == []
    live = subprocess.Popen([sys.executable, '-c', script, str(run / 'models' / 'fold_0.pth')], stdout=subprocess.PIPE, text=True)
    try:                                                                 # a writer still at work keeps its file
        temporary = Path(live.stdout.readline().strip())
        run_training(data, run, **TRAIN)
        assert temporary.exists()
    finally: live.kill(); live.wait()


# ---------------------------------------------------------------- the fixes the data check names work

def test_classes_named_by_the_check_train_and_predict_a_row_per_class(data_factory, tmp_path, capsys):
    "Masks of codes 0..2 are refused with two classes ('pass --classes 3'); with --classes 3 they train, and the submission has a row per image and class, thresholded as asked."
    data = data_factory(1, 3, size=(32, 32), n_images=8)
    out = tmp_path / 'run'
    code, err = run_cli(['train', str(data), '--out', str(out), '--arch', 'resnet10t', '--epochs', '1', '--bs', '2', '--folds', '2'], capsys)
    assert code == 1 and 'pass --classes 3' in err, err
    code, err = run_cli(['train', str(data), '--out', str(out), '--arch', 'resnet10t', '--epochs', '1', '--bs', '2', '--folds', '2',
                         '--classes', '3'], capsys)
    assert code == 0, err
    record = json.loads(fold_paths(out / 'models', 0)['record'].read_text())
    assert record['n_out'] == 3 and record['activation'] == 'softmax' and record['monitor'] == 'dice_multi'
    test = images_of(data)[:2]
    submission = run_prediction(out / 'models', test, tmp_path / 's.csv', threshold=0., min_area=0)     # 0: the plain argmax
    ids = [line.split(',')[0] for line in submission.read_text().splitlines()[1:]]
    assert ids == [f'{p.stem}_{c}' for p in test for c in (1, 2)]
    probs = FoldEnsemble.from_dir(out / 'models', device='cpu').predict(test, progress=False)
    rows = dict(line.split(',') for line in submission.read_text().splitlines()[1:])
    for image, image_probs in zip(test, probs):                         # each class's row is where it wins the argmax
        for c in (1, 2): np.testing.assert_array_equal(rle_decode(rows[f'{image.stem}_{c}'], (32, 32)), (image_probs.argmax(0) == c).numpy())
    confident = dict(line.split(',') for line in run_prediction(out / 'models', test, tmp_path / 't.csv', threshold=0.5).read_text().splitlines()[1:])
    for image, image_probs in zip(test, probs):                         # --threshold 0.5: where it wins with more than 0.5
        for c in (1, 2): np.testing.assert_array_equal(rle_decode(confident[f'{image.stem}_{c}'], (32, 32)),
                                                       ((image_probs.argmax(0) == c) & (image_probs[c] > 0.5)).numpy())


# ---------------------------------------------------------------- issue 26: numbers
from types import SimpleNamespace

from fastunet.learner.metrics import tgs_scores
from fastunet.pipeline.submission import search_class_thresholds, search_threshold, write_submission
from fastunet.pipeline.task import Task
from fastunet.pipeline.thresholds import choose_thresholds

_TRUTHS = torch.zeros(4, 8, 8, dtype=torch.bool)
_TRUTHS[0, 2:6, 2:6] = True
_PROBS = torch.where(_TRUTHS, 0.8, 0.1)


@pytest.mark.parametrize('search, message', [
    (lambda: search_threshold(torch.full((4, 8, 8), float('nan')), _TRUTHS, tgs_scores),
     '256 of the 256 out-of-fold probabilities are NaN: a diverged model'),
    (lambda: search_threshold(_PROBS * 6.25 - 1, _TRUTHS, tgs_scores), 'these span [-0.375, 4]: logits? Apply torch.sigmoid'),
    (lambda: search_threshold(_PROBS, _TRUTHS, tgs_scores, thresholds=[]), 'thresholds must be probabilities in [0, 1], at least one; got []'),
    (lambda: search_threshold(_PROBS, _TRUTHS[:, :4], tgs_scores), 'probs (4, 8, 8) and truths (4, 4, 8) must have the same shape'),
    (lambda: search_class_thresholds(torch.full((4, 2, 8, 8), float('nan')), torch.zeros(4, 2, 8, 8)), '512 of the 512 out-of-fold probabilities are NaN'),
    (lambda: choose_thresholds(Task.binary(), torch.full((4, 1, 8, 8), float('nan')), _TRUTHS[:, None], folds=[0, 1, 0, 1]),
     '256 of the 256 out-of-fold probabilities are NaN (4 of 4 images, fold(s) [0, 1]): the run diverged'),
    (lambda: choose_thresholds(Task.classes(3), torch.full((4, 3, 8, 8), float('nan')), torch.zeros(4, 2, 8, 8)), 'the run diverged'),
    (lambda: choose_thresholds(Task.multilabel(['a']), _PROBS[:, None] * 5, _TRUTHS[:, None]), 'logits?'),
    (lambda: choose_thresholds(Task.binary(), _PROBS[:, None], _TRUTHS[:3, None]), 'got (4, 1, 8, 8) and (3, 1, 8, 8)'),
])
def test_the_threshold_search_refuses_numbers_it_cannot_choose_on(search, message):
    with pytest.raises(ValueError) as error: search()
    assert message in str(error.value), error.value


@pytest.mark.parametrize('rows, message', [
    ([('a', ''), (float('nan'), '1 1'), (float('nan'), '')], "row 1 has no id (nan)"),
    ([(None, '')], 'row 0 has no id (None)'),
    ([('a', ''), ('  ', '')], "row 1 has no id ('  ')"),
    ([(1, ''), ('1', '1 1')], "the id '1' comes twice, in rows 0 and 1"),
    ([('a', '1 1'), 'ab'], "row 1 is the string 'ab', not a tuple of 2 values"),
])
def test_write_submission_refuses_ids_it_cannot_write_and_leaves_the_file(tmp_path, rows, message):
    path = write_submission([('good', '1 1')], tmp_path / 'submission.csv')
    with pytest.raises(ValueError) as error: write_submission(iter(rows), path)
    assert message in str(error.value), error.value
    assert path.read_text().splitlines() == ['id,rle_mask', 'good,1 1'] and sorted(p.name for p in tmp_path.iterdir()) == ['submission.csv']


def test_rle_encode_refuses_nan_probabilities():
    with pytest.raises(ValueError, match='3 of the 6 probabilities of this mask are NaN'):
        rle_encode(np.array([[np.nan, 0.7, np.nan], [0.2, np.nan, 0.9]]), threshold=0.5)


@pytest.mark.parametrize('rle, shape, message', [
    ('1 5 3 2', (3, 3), "run 2 ('3 2') starts before run 1 ('1 5') ends: Kaggle refuses overlapping or unsorted runs"),
    ('5 1 1 2', (3, 3), "run 2 ('1 2') starts before run 1 ('5 1') ends"),
    ('7 5', (3, 3), "run 1 ('7 5') does not fit a 3×3 mask (pixels 1 to 9)"),
    ('1 1 3 0', (3, 3), "run 2 ('3 0') has length 0"),
    ('1 -2', (3, 3), "has length -2"),
    ('1 2 3', (3, 3), 'start/length pairs; got 3 numbers'),
    ('1 2.5', (3, 3), 'whole numbers only'),
    ('1 1', (-1, 3), 'two positive whole numbers; got (-1, 3)'),
    ('1 1', (3, 3, 1), 'two positive whole numbers; got (3, 3, 1)'),
])
def test_rle_decode_refuses_what_kaggle_refuses(rle, shape, message):
    with pytest.raises(ValueError) as error: rle_decode(rle, shape)
    assert message in str(error.value), error.value


def test_rle_decode_of_many_runs_is_exact():
    mask = np.random.default_rng(0).random((300, 200)) > 0.5
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), mask.shape), mask)
    assert rle_decode('1 2 3 1', (2, 2)).tolist() == [[1, 1], [1, 0]]          # runs that meet are apart, not overlapping


@pytest.mark.parametrize('task', [Task.binary(), Task.classes(3), Task.multilabel(['a', 'b'])], ids=lambda t: t.kind)
@pytest.mark.parametrize('predicted', [False, True], ids=['empty prediction', 'false alarm'])
def test_every_default_metric_is_a_number_on_a_fold_without_foreground(task, predicted):
    truths = torch.zeros(3, task.n_out if task.kind == 'multilabel' else 1, 8, 8, dtype=torch.long)
    logits = torch.full((3, task.n_out, 8, 8), 5. if predicted else -5.)
    if task.kind == 'classes': logits[:, 0], truths = -logits[:, 0], truths[:, 0]     # background wins unless a false alarm
    for metric in task.metrics():
        metric.reset()
        metric.accumulate(SimpleNamespace(pred=logits, y=truths))
        assert isinstance(metric.value, float) and math.isfinite(metric.value), (metric.name, metric.value)
        if task.kind != 'classes': assert metric.value == (0. if predicted else 1.), (metric.name, metric.value)


def test_a_fold_without_foreground_trains_and_reports_numbers(tmp_path, capsys):
    "11 empty masks and one positive, two folds: one fold's validation masks are all empty (IoU was None: a TypeError)."
    data = make_synthetic_dataset(tmp_path / 'data', n_images=12, size=(32, 32), seed=5)
    for mask in masks_of(data)[1:]: Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--arch', 'resnet10t', '--epochs', '1', '--bs', '2',
                         '--folds', '2', '--lr', '0.01', '--seed', '0'], capsys)
    assert code == 0, err
    histories = [json.loads(fold_paths(tmp_path / 'run' / 'models', fold)['record'].read_text())['history'] for fold in (0, 1)]
    scores = [epoch[name] for history in histories for epoch in history for name in ('iou', 'tgs_metric')]
    assert all(isinstance(score, float) and math.isfinite(score) for score in scores), histories
    assert any(epoch['iou'] == 1. for history in histories for epoch in history), histories    # empty vs empty was met: IoU 1


# ---------------------------------------------------------------- issue 26: files and command line

CLI_TRAIN = ['--arch', 'resnet10t', '--folds', '2', '--epochs', '1', '--bs', '2']


def snapshot(folder: Path) -> dict:
    "Every file under `folder` and its bytes: what must stay as it was."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_train_writes_only_into_a_new_empty_or_own_folder(data_factory, tmp_path, capsys):
    "Issue 26, case 12: a user's folds.csv and report.json in --out were overwritten; --out naming a file was a NotADirectoryError traceback."
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    project = tmp_path / 'project'
    project.mkdir()
    for name in ('folds.csv', 'report.json'): (project / name).write_text('mine')
    before = snapshot(project)
    for restart in ([], ['--restart']):                  # --restart replaces a run, never a folder that is not a run's
        code, err = run_cli(['train', str(data), '--out', str(project), *CLI_TRAIN, *restart], capsys)
        assert code == 1 and "holds files that fastunet did not write (folds.csv, report.json)" in err and 'Choose another --out' in err, err
    code, err = run_cli(['train', str(data), '--out', str(project / 'folds.csv'), *CLI_TRAIN], capsys)
    assert code == 1 and "is a file, not a folder: choose another --out" in err and 'Traceback' not in err, err
    assert snapshot(project) == before


def test_the_demo_never_replaces_a_project(trained_run, tmp_path, capsys):
    "Issue 26, case 13: `fastunet demo --dest proj` replaced a trained run, its images and submission.csv, and exited 0."
    from fastunet.pipeline.files import DEMO_MARK, check_ours_to_write
    _, _, test_images = trained_run
    project = copy_run(trained_run, tmp_path)
    shutil.copytree(test_images[0].parent, project / 'images')
    (project / 'submission.csv').write_text('id,rle_mask\n0000,1 2\n')
    before = snapshot(project)
    code, err = run_cli(['demo', '--dest', str(project), '--n-images', '8', '--folds', '2', '--epochs', '1', '--size', '32'], capsys)
    assert code == 1 and f"--dest '{project}' holds files that fastunet demo did not write" in err and 'Choose another --dest' in err, err
    assert snapshot(project) == before
    (project / DEMO_MARK).write_text('{}')                # a demo's own folder: the next demo may replace it
    check_ours_to_write(project, marks=[DEMO_MARK], flag='--dest')


@pytest.mark.slow
def test_a_demo_reruns_into_its_own_folder(tmp_path, capsys):
    "The demo marks its folder: run twice into one --dest, it replaces its own files."
    from fastunet.pipeline.files import DEMO_MARK
    for _ in range(2):
        code, err = run_cli(['demo', '--dest', str(tmp_path / 'demo'), '--n-images', '8', '--n-test', '2', '--folds', '2', '--epochs', '1',
                             '--size', '32', '--bs', '4'], capsys)
        assert code == 0, err
    assert (tmp_path / 'demo' / DEMO_MARK).exists() and (tmp_path / 'demo' / 'submission.csv').exists()
    (tmp_path / 'demo' / DEMO_MARK).unlink()             # a demo of fastunet before the mark: known by its run's data folder
    code, err = run_cli(['demo', '--dest', str(tmp_path / 'demo'), '--n-images', '8', '--n-test', '2', '--folds', '2', '--epochs', '1',
                         '--size', '32', '--bs', '4'], capsys)
    assert code == 0, err


def test_predict_never_writes_over_an_input_or_a_file_it_did_not_write(trained_run, tmp_path, capsys):
    "Issue 26, case 14: `--out data/test/images/0000.png` replaced the input image with CSV text."
    _, run, test_images = trained_run
    images = Path(shutil.copytree(test_images[0].parent, tmp_path / 'images'))
    notes = tmp_path / 'notes.csv'
    notes.write_text('name,score\nme,1\n')
    before = {**snapshot(images), 'notes': notes.read_bytes()}
    for out, message in [(images / '0000.png', 'is one of the input files'),
                         (notes, "exists and is not a file this command writes (it begins 'name,score', not 'id,rle_mask')")]:
        code, err = run_cli(['predict', str(run / 'models'), str(images), '--out', str(out)], capsys)
        assert code == 1 and message in err and 'choose another --out' in err and 'Traceback' not in err, err
    assert {**snapshot(images), 'notes': notes.read_bytes()} == before
    previous = tmp_path / 's.csv'
    previous.write_text('id,rle_mask\nold,1 2\n')        # a submission this command wrote: written again
    code, err = run_cli(['predict', str(run / 'models'), str(images), '--out', str(previous)], capsys)
    assert code == 0 and 'old' not in previous.read_text(), err


def test_predict_names_the_run_folder_and_swapped_folders(trained_run, tmp_path, capsys):
    "Issue 26: `predict RUN IMAGES` (not RUN/models), and `predict IMAGES RUN/models`."
    _, run, test_images = trained_run
    images = test_images[0].parent
    code, err = run_cli(['predict', str(run), str(images), '--out', str(tmp_path / 's.csv')], capsys)
    assert code == 1 and f"is a run folder, not its models: did you mean '{run / 'models'}'?" in err, err
    code, err = run_cli(['predict', str(images), str(run / 'models'), '--out', str(tmp_path / 's.csv')], capsys)
    assert code == 1 and 'the two folders look swapped' in err and 'Traceback' not in err, err
    assert not (tmp_path / 's.csv').exists()


@pytest.mark.parametrize('argv, message', [
    (['--arch', 'resnet_nope'], "no encoder named 'resnet_nope' in timm, pretrainedmodels or torchvision"),
    (['--arch', 'resnet10t', '--encoder-kwargs', '{"features": 32}'], "the encoder 'resnet10t' takes no option 'features'; the options it takes: "),
    (['--arch', 'resnet10t', '--weights', 'absent.pth'], "weights file 'absent.pth' does not exist"),
], ids=['unknown arch', 'encoder option it does not take', 'missing weights file'])
def test_encoder_mistakes_are_named_before_anything_is_written(data_factory, tmp_path, capsys, argv, message):
    "Issue 26: an unknown --arch was a pretrainedmodels traceback; --encoder-kwargs features said 'pick a hierarchical backbone' and left an empty run.json."
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--folds', '2', '--epochs', '1', *argv], capsys)
    assert code == 1 and message in err and 'hierarchical' not in err and 'Traceback' not in err, err
    assert not (tmp_path / 'run').exists()


def test_pretrained_offline_says_to_pass_weights(data_factory, tmp_path, capsys, monkeypatch):
    "Issue 26: --pretrained without network was a traceback after 56 s; the download fails fast here (as with HF_HUB_OFFLINE=1)."
    import timm.models._builder
    from huggingface_hub.errors import OfflineModeIsEnabled
    def offline(*args, **kwargs): raise OfflineModeIsEnabled('no network')
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_hf', offline)
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_url', offline)
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), *CLI_TRAIN, '--pretrained'], capsys)
    assert code == 1 and "no network to download the pretrained weights of 'resnet10t'" in err and '--weights resnet10t.pth' in err, err
    assert 'Traceback' not in err and not (tmp_path / 'run').exists()


def test_train_starts_the_encoder_from_weights(data_factory, tmp_path, capsys):
    "Issue 26: --weights FILE (what --pretrained needs the network for): the folds start from the file; a file that does not fit is refused."
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    torch.save(timm.create_model('mobilenetv3_small_050').state_dict(), tmp_path / 'other.pth')
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), *CLI_TRAIN, '--weights', str(tmp_path / 'other.pth')], capsys)
    assert code == 1 and "could not load weights" in err and 'Traceback' not in err, err
    assert not (tmp_path / 'run').exists()
    source = timm.create_model('resnet10t').state_dict()
    torch.save(source, tmp_path / 'w.pth')
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), *CLI_TRAIN, '--weights', str(tmp_path / 'w.pth')], capsys)
    assert code == 0, err
    assert read_run(tmp_path / 'run' / 'models')['definition']['learner']['weights'] == str((tmp_path / 'w.pth').resolve())
    from fastunet.encoders.weights import load_local_state_dict
    fold = load_local_state_dict(fold_paths(tmp_path / 'run' / 'models', 0)['weights'])     # a plain or a wrapped state dict
    # the encoder trained frozen, as from pretrained weights: its convolutions are still the file's
    torch.testing.assert_close(fold['encoder.model.layer4.0.conv2.weight'].float(), source['layer4.0.conv2.weight'])


def test_an_overlap_that_multiplies_the_tiles_is_refused(trained_run, tmp_path, capsys):
    "Issue 26: --tile 64 --overlap 0.99 was accepted and ran for minutes (48,705 tiles for a 192×256 image)."
    _, run, _ = trained_run
    images = tmp_path / 'large'
    images.mkdir()
    Image.new('L', (256, 192)).save(images / 'big.png')
    code, err = run_cli(['predict', str(run / 'models'), str(images), '--out', str(tmp_path / 's.csv'), '--tile', '64', '--overlap', '0.99'], capsys)
    assert code == 1 and 'makes 48,705 tiles for the largest image (192×256) instead of 12 without overlap' in err, err
    assert re.search(r'use --overlap 0\.\d+ or less', err) and not (tmp_path / 's.csv').exists()


# ---------------------------------------------------------------- issue 26: data
from fastunet.learner.multilabel import MultiLabelMasks
from fastunet.pipeline.data_folder import folder_channels

TRAIN_ARGV = ['--arch', 'resnet10t', '--epochs', '1', '--bs', '2', '--folds', '2']


@pytest.mark.parametrize('classes', ['3', '300'])
def test_classes_that_occur_in_no_mask_are_refused(data_factory, tmp_path, capsys, classes):
    "--classes 300 (or 3) on 0/1 masks trained a 300-class model and reported a Dice padded by classes that never occur."
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), *TRAIN_ARGV, '--classes', classes], capsys)
    assert code == 1, err
    assert f'{classes} classes, but the masks hold codes [0, 1] only' in err, err
    assert 'leave out --classes (binary) or pass --classes 2' in err and 'Traceback' not in err, err
    assert not (tmp_path / 'run' / 'models').exists()


def test_a_multilabel_label_whose_masks_are_all_empty_is_refused(data_factory, tmp_path, capsys):
    data = copy_data(data_factory, tmp_path)
    for label in ('cat', 'dog'): (data / 'labels' / label).mkdir(parents=True)
    for mask in masks_of(data):
        shutil.copy(mask, data / 'labels' / 'cat' / mask.name)
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / 'labels' / 'dog' / mask.name)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), *TRAIN_ARGV, '--multilabel', '--mask-folder', 'labels'], capsys)
    assert code == 1 and "the masks of label(s) ['dog'] are empty in every image" in err, err
    assert 'remove the folders from the mask folder' in err and not (tmp_path / 'run' / 'models').exists()


def black_in(mode: str) -> Image.Image:
    "An opaque black mask with nothing drawn, stored in `mode`."
    return Image.fromarray(np.zeros((32, 32), np.uint8)).convert(mode)


@pytest.mark.parametrize('mode', ['L', 'P', 'RGB', 'RGBA', 'LA'])
def test_an_opaque_black_mask_is_empty_in_every_mode(data_factory, tmp_path, mode):
    "--binary-masks read an all-black P, RGBA or LA mask as 100 % foreground (the opaque alpha taken as the drawing); multi-label too."
    data = copy_data(data_factory, tmp_path)
    black_in(mode).save(masks_of(data)[0])
    np.testing.assert_array_equal(MaskFromFolder(binary=True).array(images_of(data)[0]), np.zeros((32, 32), np.uint8))
    (data / 'labels' / 'a').mkdir(parents=True)
    black_in(mode).save(data / 'labels' / 'a' / '0000.png')
    assert not MultiLabelMasks(['a'], 'labels').array(images_of(data)[0]).any()


def test_foreground_masks_with_palette_or_alpha_read_what_is_drawn(data_factory, tmp_path):
    "The usual drawings: white on opaque black, colour on a transparent sheet, a palette whose index 0 is black, black on transparent."
    data = copy_data(data_factory, tmp_path)
    truth = np.array(Image.open(masks_of(data)[0])) > 0
    image, mask_path = images_of(data)[0], masks_of(data)[0]
    drawn = np.zeros((32, 32, 4), np.uint8)
    drawn[..., 3] = 255; drawn[truth, :3] = 255                                            # white on opaque black (RGBA)
    Image.fromarray(drawn).save(mask_path)
    np.testing.assert_array_equal(MaskFromFolder(binary=True).array(image), truth)
    drawn = np.full((32, 32, 4), 255, np.uint8); drawn[..., 3] = 0                        # red on a transparent white sheet
    drawn[truth] = (255, 0, 0, 255)
    Image.fromarray(drawn).save(mask_path)
    np.testing.assert_array_equal(MaskFromFolder(binary=True).array(image), truth)
    drawn[..., :3] = 0                                                                    # black on a transparent sheet: the alpha is the drawing
    Image.fromarray(drawn).save(mask_path)
    np.testing.assert_array_equal(MaskFromFolder(binary=True).array(image), truth)
    palette = Image.fromarray(truth.astype(np.uint8), mode='P'); palette.putpalette([0, 0, 0, 0, 255, 0])   # index 0 black, 1 green
    palette.save(mask_path)
    np.testing.assert_array_equal(MaskFromFolder(binary=True).array(image), truth)
    np.testing.assert_array_equal(Image.open(mask_path).convert('LA').getchannel('A'), np.full((32, 32), 255))   # an opaque palette
    Image.fromarray(np.stack([truth * 255, np.full((32, 32), 255)], -1).astype(np.uint8), 'LA').save(mask_path)   # LA: white on black
    np.testing.assert_array_equal(MaskFromFolder(binary=True).array(image), truth)


def test_colour_images_after_a_grey_first_image_make_an_rgb_model(data_factory, tmp_path, capsys):
    "The channels came from the first file: a grey first image made a 1-channel model, and the RGB images were converted without a word."
    data = copy_data(data_factory, tmp_path)
    for path in images_of(data)[1:]:
        grey = np.array(Image.open(path))
        Image.fromarray(np.stack([grey, 255 - grey, grey // 2], -1)).save(path)
    assert folder_channels(images_of(data)) == 3
    assert "of the 8 images, 1 grey image(s) (e.g. '0000.png') are read as RGB" in capsys.readouterr().out


def test_a_bool_npy_image_is_refused_and_npy_images_without_tile_are_named(trained_run, tmp_path, capsys):
    _, run, _ = trained_run
    folder = tmp_path / 'arrays'
    folder.mkdir()
    np.save(folder / 'mask_like.npy', np.random.default_rng(0).random((32, 32)) > 0.5)
    code, err = run_cli(['predict', str(run / 'models'), str(folder), '--out', str(tmp_path / 's.csv')], capsys)
    assert code == 1 and "1 .npy image(s) in" in err and 'are read only with --tile: to predict them, pass --tile T' in err, err
    code, err = run_cli(['predict', str(run / 'models'), str(folder), '--out', str(tmp_path / 's.csv'), '--tile', '32'], capsys)
    assert code == 1 and "mask_like.npy' holds bool values" in err and 'astype(np.uint8) * 255' in err, err
    assert not (tmp_path / 's.csv').exists()


def jpeg_images(data: Path) -> None:
    "The images as JPEG files; the masks stay PNG."
    for path in images_of(data):
        Image.open(path).save(path.with_suffix('.jpg'), quality=95)
        path.unlink()


def test_jpeg_images_with_png_masks_train_with_mask_suffix(data_factory, tmp_path, capsys, trained_run):
    data = copy_data(data_factory, tmp_path)
    jpeg_images(data)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), *TRAIN_ARGV], capsys)
    assert code == 1 and f"no mask for '{data / 'images' / '0000.jpg'}'" in err, err
    assert f"'{data / 'masks' / '0000.png'}' exists: pass --mask-suffix .png" in err, err
    report = run_training(data, tmp_path / 'run', **TRAIN, mask_suffix='.png')
    assert len(report['cv']) == 2 and 'oof_tgs' in report                # the threshold search read the PNG masks too
    assert read_run(tmp_path / 'run' / 'models')['definition']['mask_suffix'] == '.png'
    assert 'mask_suffix' not in read_run(trained_run[1] / 'models')['definition']     # a run without it: its definition unchanged


def test_mask_suffix_finds_masks_named_after_their_image_with_an_ending(data_factory, tmp_path):
    "'_mask.png': images/x.jpg → masks/x_mask.png, through the DataBlock and multi-label masks."
    data = copy_data(data_factory, tmp_path)
    jpeg_images(data)
    for mask in masks_of(data): mask.rename(mask.with_name(mask.stem + '_mask.png'))
    image = sorted((data / 'images').glob('*.jpg'))[0]
    assert MaskFromFolder(suffix='_mask.png').path(image) == data / 'masks' / '0000_mask.png'
    with pytest.raises(FileNotFoundError, match='exists: pass --mask-suffix _mask.png'): MaskFromFolder().array(image)
    items = pd.DataFrame({'item': [str(p) for p in sorted((data / 'images').glob('*.jpg'))]})
    x, y = segmentation_block(mask_suffix='_mask.png').datasets(items)[0]
    assert y.shape == (32, 32)
    (data / 'labels' / 'a').mkdir(parents=True)
    shutil.copy(data / 'masks' / '0000_mask.png', data / 'labels' / 'a' / '0000_mask.png')
    assert MultiLabelMasks(['a'], 'labels', suffix='_mask.png').array(image).shape == (32, 32)


def test_a_truncated_mask_is_named_itself(data_factory, tmp_path, capsys):
    data = copy_data(data_factory, tmp_path)
    truncate(masks_of(data)[2])
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), *TRAIN_ARGV], capsys)
    assert code == 1 and f"mask '{data / 'masks' / '0002.png'}' cannot be read: it is truncated or not an image" in err, err


# ---------------------------------------------------------------- issue 26: fold identity

def test_a_fold_whose_predictions_are_nan_diverged_and_is_not_kept(trained_run, tmp_path):
    "Case: --lr 1e6 gave NaN out-of-fold probabilities with finite weights; both folds were kept and the report said oof_tgs 0.25."
    data, _, _ = trained_run
    with pytest.raises(ValueError, match=r"fold 0 diverged: \d+ of its \d+ out-of-fold probabilities .* are NaN or infinite.*"
                                         r"Lower the learning rate \(lr=1000000.0\)"):
        run_training(data, tmp_path / 'run', **{**TRAIN, 'lr': 1e6})
    assert not list((tmp_path / 'run' / 'models').glob('fold_*'))           # nothing of the fold kept (and no lock left)


def other_weights(run: Path, fold: int, change: str) -> dict:
    "A checkpoint for fold `fold`'s file: fold 0's, another run's of the same architecture, a 3-class run's, or a plain state dict."
    checkpoint = torch.load(fold_paths(run, 0 if change == "fold 0's" else fold)['weights'], weights_only=True)
    if change == "another run's": checkpoint['fastunet'] = {**checkpoint['fastunet'], 'run_id': '0123456789ab'}
    elif change == "a 3-class run's":
        model = MoreDynamicUnet('resnet10t', n_out=3, n_in=checkpoint['fastunet']['n_in'], pretrained=False)
        task = dict(kind='classes', labels=['0', '1', '2'])
        checkpoint = {'fastunet': {**checkpoint['fastunet'], 'run_id': '0123456789ab', 'n_out': 3, 'activation': 'softmax', 'task': task},
                      'model': model.state_dict()}
    elif change == 'a plain state dict': checkpoint = checkpoint['model']          # fastunet 0.1.0's format, in a new run
    return checkpoint


@pytest.mark.parametrize('change', ["fold 0's", "another run's", "a 3-class run's", 'a plain state dict', 'NaN predictions'])
def test_weights_of_another_run_or_fold_are_trained_again_and_refused_by_predict(trained_run, tmp_path, capsys, change):
    "Case: a fold's .pth replaced by other weights: resume said nothing, kept the fold, and predict used it."
    data, _, test_images = trained_run
    run = copy_run(trained_run, tmp_path)
    paths = fold_paths(run / 'models', 1)
    if change == 'NaN predictions':
        oof = np.load(paths['oof'])
        np.save(paths['oof'], np.full_like(oof, np.nan))
        message = f"out-of-fold predictions '{paths['oof']}' hold NaN or infinite values (it diverged)"
    else:
        torch.save(other_weights(run / 'models', 1, change), paths['weights'])
        message = f"weights '{paths['weights']}' " + ('carry no identity' if change == 'a plain state dict' else 'belong to run ')
        with pytest.raises(ValueError, match=re.escape(f"fold 1's {message}")):         # predict refuses it, naming the file and whose
            run_prediction(run / 'models', test_images, tmp_path / 's.csv', device='cpu')
        if change != 'a plain state dict':
            whose = {"fold 0's": 'fold 0 (resnet10t, 1 output(s), sigmoid)', "another run's": 'run 0123456789ab fold 1',
                     "a 3-class run's": 'run 0123456789ab fold 1 (resnet10t, 3 output(s), softmax)'}[change]
            with pytest.raises(ValueError, match=re.escape(whose)): FoldEnsemble.from_dir(run / 'models', device='cpu')
    untouched = fold_paths(run / 'models', 0)['weights'].stat().st_mtime_ns
    run_training(data, run, **TRAIN)
    assert f'fold 1 is trained again: its {message}' in capsys.readouterr().out
    assert fold_paths(run / 'models', 0)['weights'].stat().st_mtime_ns == untouched
    FoldEnsemble.from_dir(run / 'models', device='cpu')                      # whole again


@pytest.mark.parametrize('run_json', [True, False])
def test_folds_of_two_runs_are_not_ensembled_with_or_without_run_json(trained_run, tmp_path, run_json):
    "Case: a models folder without run.json held fold 0 of one run and fold 1 of another; predict ensembled them."
    models = copy_run(trained_run, tmp_path) / 'models'
    own = read_run(models)['run_id']
    if not run_json: (models / 'run.json').unlink()
    paths = fold_paths(models, 1)                                            # fold 1 of another run, whole: record and weights agree
    paths['record'].write_text(json.dumps({**json.loads(paths['record'].read_text()), 'run_id': '0123456789ab'}))
    torch.save(other_weights(models, 1, "another run's"), paths['weights'])
    message = (rf"fold\(s\) \[1\] in '{re.escape(str(models))}' were written by another run" if run_json else
               re.escape(f"were written by different runs (fold: run id {{0: '{own}', 1: '0123456789ab'}})"))
    with pytest.raises(ValueError, match=message): FoldEnsemble.from_dir(models, device='cpu')


def zero_score(pred, target): return torch.tensor(0.)      # a monitored score that plateaus from the first epoch


def test_a_plateau_of_the_monitored_score_keeps_the_epoch_of_the_lowest_validation_loss(data_factory, tmp_path):
    "Case: the score stayed at 0 and epoch 0 was kept while the validation loss fell; ties go to the lower loss, then the later epoch."
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    df = make_folds([str(p) for p in images_of(data)], n_folds=2, seed=0)
    train_folds(segmentation_block(1, binary_masks=True), df, 'resnet10t', tmp_path, epochs=4, lr=3e-3, bs=2, seed=0, folds=[0],
                monitor='zero_score', dls_kwargs=dict(num_workers=0),
                learner_kwargs=dict(n_out=1, pretrained=False, loss_func=BCELovaszLoss(), metrics=[zero_score]))
    record = json.loads(fold_paths(tmp_path, 0)['record'].read_text())
    losses = [epoch['valid_loss'] for epoch in record['history']]
    assert [epoch['zero_score'] for epoch in record['history']] == [0.0] * 4
    lowest = max(i for i, loss in enumerate(losses) if loss == min(losses))
    assert lowest > 0 and record['best_epoch'] == lowest, losses                # not the plateau's first epoch


def test_restart_deletes_only_the_runs_own_fold_files_by_exact_name(trained_run, tmp_path):
    "Case: --restart deleted a user's fold_01.json (any fold_<digits> name was taken for the run's)."
    data, _, _ = trained_run
    run = copy_run(trained_run, tmp_path)
    models = run / 'models'
    mine = {'fold_01.json': fold_paths(models, 1)['record'].read_text(), 'fold_00_oof.npy': 'mine', 'fold_0_backup.pth': 'mine',
            'fold_1.json.bak': 'mine', 'fold_1.pth.old': 'mine', 'fold_2_notes.txt': 'mine'}
    for name, text in mine.items(): (models / name).write_text(text)
    stamps = {p: p.stat().st_mtime_ns for fold in (0, 1) for p in fold_paths(models, fold).values()}
    run_training(data, run, **TRAIN, restart=True)
    assert {name: (models / name).read_text() for name in mine} == mine       # every one of the user's files, as it was
    assert all(p.stat().st_mtime_ns != stamp for p, stamp in stamps.items())     # the run's own were replaced
    assert len(FoldEnsemble.from_dir(models, device='cpu').models) == 2       # fold_01.json is not read as a fold


TWO_WRITERS = '''
import sys, time
from pathlib import Path
from fastunet.pipeline.workflow import run_training
data, out, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(out.parent / f'{name}.ready').touch()
while not (out.parent / 'go').exists(): time.sleep(0.01)       # both processes start training at the same moment
run_training(data, out, arch='resnet10t', n_folds=2, epochs=1, lr=3e-3, bs=2, seed=0)
'''


@pytest.mark.slow
def test_two_processes_into_one_out_never_train_the_same_fold(trained_run, tmp_path):
    "Case: two `fastunet train` into one --out both trained every fold; a per-fold lock gives each fold to one of them."
    import time
    data, _, _ = trained_run
    out = tmp_path / 'run'
    writers = [subprocess.Popen([sys.executable, '-c', TWO_WRITERS, str(data), str(out), name], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for name in ('a', 'b')]
    while not all((tmp_path / f'{name}.ready').exists() for name in ('a', 'b')):
        assert all(w.poll() is None for w in writers), [w.communicate()[0][-3000:] for w in writers]
        time.sleep(0.05)
    (tmp_path / 'go').touch()
    logs = [w.communicate(timeout=240)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [log[-3000:] for log in logs]
    fits = [log.count('train_loss') for log in logs]                         # fastai prints a table header per fold trained
    assert sum(fits) == 2, (fits, [log[-3000:] for log in logs])             # each fold trained exactly once, by one of them
    assert not list((out / 'models').glob('*.lock')) and len(FoldEnsemble.from_dir(out / 'models', device='cpu').models) == 2


def test_prediction_says_when_images_are_read_with_other_channels_than_the_model_takes(trained_run, tmp_path, capsys):
    "Case 5 at prediction: an RGB image given to a grey model is converted, and said so, not silently."
    _, run, test_images = trained_run
    Image.open(test_images[0]).convert('RGB').save(tmp_path / 'colour.png')
    run_prediction(run / 'models', [test_images[1], tmp_path / 'colour.png'], tmp_path / 's.csv')
    assert "1 RGB image(s) (e.g. 'colour.png') are read as grey, which drops what they hold beyond it" in capsys.readouterr().out


def test_a_lock_left_by_an_earlier_process_with_our_pid_is_taken_over(tmp_path, capsys):
    "A restarted container's process often has the pid of the one that died holding the lock: it must not wait for itself."
    from fastunet.pipeline.files import this_writer
    from fastunet.pipeline.lock import fold_lock_path, release_fold_lock, take_fold_lock
    fold_lock_path(tmp_path, 0).write_text(json.dumps({**this_writer(), 'token': 'an earlier process'}))
    lock = take_fold_lock(tmp_path, 0)
    assert lock.taken and 'which has ended: this process takes the fold over' in capsys.readouterr().out
    assert not take_fold_lock(tmp_path, 0).taken                       # this process's own lock is held, not taken twice
    release_fold_lock(lock)
    assert not fold_lock_path(tmp_path, 0).exists()


def test_nan_predictions_are_refused_not_written_as_empty_masks(trained_run, tmp_path):
    "NaN > threshold is False: a fold that predicts NaN would write empty masks into the submission without a word."
    _, run, test_images = trained_run
    ensemble = FoldEnsemble.from_dir(run / 'models', device='cpu')
    with torch.no_grad():
        for parameter in ensemble.models[0].parameters(): parameter.fill_(float('nan'))
    with pytest.raises(ValueError, match=r'the predictions for 3 of the 3 images of a batch hold NaN: a fold whose weights diverged'):
        ensemble.predict(test_images, progress=False)


def test_predict_rewrites_its_own_earlier_submission_under_another_header(trained_run, tmp_path):
    "An earlier submission (the same id column) is this command's to replace, whatever its other columns were called."
    _, run, test_images = trained_run
    out = run_prediction(run / 'models', test_images, tmp_path / 's.csv')
    run_prediction(run / 'models', test_images, out, header=('id', 'EncodedPixels'))
    assert out.read_text().splitlines()[0] == 'id,EncodedPixels'


def test_a_users_file_named_like_a_fold_record_does_not_make_a_folder_a_run(data_factory, tmp_path, capsys):
    "models/fold_01.json is not a name fastunet writes: beside the user's folds.csv it must not open the folder to a run."
    data = data_factory(1, 2, size=(32, 32), n_images=8)
    out = tmp_path / 'mine'
    (out / 'models').mkdir(parents=True)
    (out / 'models' / 'fold_01.json').write_text('{}')
    (out / 'folds.csv').write_text('mine\n')
    code, err = run_cli(['train', str(data), '--out', str(out), '--arch', 'resnet10t', '--folds', '2', '--epochs', '1', '--restart'], capsys)
    assert code == 1 and 'holds files that fastunet did not write' in err, err
    assert (out / 'folds.csv').read_text() == 'mine\n'


# ---------------------------------------------------------------- issue 27: losses
@pytest.mark.parametrize('classes, argv, message', [
    (2, ['--loss', 'lovaz'], "--loss: unknown loss 'lovaz' (did you mean 'lovasz' or 'lovasz-softmax'?); the losses are bce, dice, focal, lovasz, "
                             "symmetric-lovasz, ce, lovasz-softmax"),
    (2, ['--loss', 'bce:0.25+symetric-lovasz'], "unknown loss 'symetric-lovasz' (did you mean 'symmetric-lovasz' or 'lovasz'?)"),
    (2, ['--loss', 'bce:-1'], "--loss: the weight of 'bce' must be a positive number, such as 'bce:0.5', not '-1'"),
    (2, ['--loss', 'bce:0+lovasz'], "--loss: the weight of 'bce' must be a positive number, such as 'bce:0.5', not '0'"),
    (2, ['--loss', 'bce:inf'], "the weight of 'bce' must be a positive number, such as 'bce:0.5', not 'inf'"),
    (2, ['--loss', 'lovasz:half'], "the weight of 'lovasz' must be a positive number, such as 'lovasz:0.5', not 'half'"),
    (2, ['--loss', 'bce+'], "--loss: 'bce+' has an empty term: write the sum as 'bce:0.25+lovasz:0.75'"),
    (2, ['--epochs', '2', '--loss-after', '2:lovasz'], "--loss-after 2:lovasz switches the loss after epoch 2, but each fold trains "
                                                        "--epochs 2: switch after 1 epoch, or train more --epochs"),
    (2, ['--epochs', '1', '--loss-after', '1:lovasz'], 'train --epochs 2 or more'),
    (2, ['--epochs', '2', '--loss-after', '0:lovasz'], '--loss-after (its epochs before the switch) must be a whole number ≥ 1, not 0'),
    (2, ['--epochs', '2', '--loss-after', 'lovasz'], "--loss-after takes EPOCH:LOSS as one value, such as '10:lovasz', not 'lovasz'"),
    (2, ['--epochs', '2', '--loss-after', '1:lovaz'], "--loss-after: unknown loss 'lovaz' (did you mean 'lovasz' or 'lovasz-softmax'?)"),
    (2, ['--loss', 'ce'], "--loss ce: a binary model has one sigmoid output, and 'ce' needs a softmax over classes: use 'bce' "
                          "(e.g. 'bce'); the losses of a binary task are bce, dice, focal, lovasz, symmetric-lovasz"),
    (2, ['--loss', 'bce:0.5+lovasz-softmax'], "--loss bce:0.5+lovasz-softmax: a binary model has one sigmoid output, and "
                                              "'lovasz-softmax' needs a softmax over classes: use 'lovasz' (e.g. 'bce:0.5+lovasz')"),
    (2, ['--epochs', '2', '--loss-after', '1:ce'], "--loss-after 1:ce: a binary model has one sigmoid output"),
    (3, ['--classes', '3', '--loss', 'bce+dice'], "--loss bce+dice: a model of classes has a softmax over them, and 'bce' is a loss of "
                                                  "independent sigmoid outputs: use 'ce' (e.g. 'ce+dice'); the losses of a classes task "
                                                  "are dice, focal, ce, lovasz-softmax"),
    (3, ['--classes', '3', '--loss', 'symmetric-lovasz'], "use 'lovasz-softmax' (e.g. 'lovasz-softmax')"),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_bad_losses_are_refused_before_anything_is_written(data_factory, tmp_path, capsys, classes, argv, message):
    data = data_factory(1, classes, size=(32, 32), n_images=8)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--arch', 'resnet10t', '--folds', '2', *argv], capsys)
    assert code == 1 and message in err, err
    assert 'Traceback' not in err
    assert not (tmp_path / 'run').exists()


def test_a_softmax_loss_for_overlapping_labels_is_refused_with_the_sigmoid_one(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / 'labels', n_images=8, size=(32, 32), labels=2, seed=3)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--arch', 'resnet10t', '--folds', '2', '--multilabel',
                         '--loss', 'bce+lovasz-softmax'], capsys)
    assert code == 1 and ("--loss bce+lovasz-softmax: a multi-label model has a sigmoid per label (labels may overlap), and "
                          "'lovasz-softmax' needs a softmax over exclusive classes: use 'lovasz' (e.g. 'bce+lovasz')") in err, err
    assert not (tmp_path / 'run').exists()


def test_a_resumed_run_keeps_the_channels_of_its_finished_folds(data_factory, tmp_path, capsys):
    "Channels are decided from every image now (once the first file's): a run resumed on a folder that became mixed keeps its model's input."
    data = copy_data(data_factory, tmp_path)
    run_training(data, tmp_path / 'run', **TRAIN, fold=0)                  # fold 0 on grey images
    Image.open(images_of(data)[5]).convert('RGB').save(images_of(data)[5])
    capsys.readouterr()
    run_training(data, tmp_path / 'run', **TRAIN)                          # the same run: fold 1 trains as fold 0 did
    assert 'trained its finished folds on 1-channel images: every image is read so' in capsys.readouterr().out
    assert FoldEnsemble.from_dir(tmp_path / 'run' / 'models', device='cpu').n_in == 1
