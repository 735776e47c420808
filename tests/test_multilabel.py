"""Multi-label (overlapping classes, a sigmoid each) and multi-class (softmax) end to end: `fastunet train`, the
out-of-fold predictions and the per-label thresholds, the fold ensemble, and submissions with a row per image and
class or a column per class. Every submission is checked against the ensemble's own predictions."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from fastai.vision.all import ColReader, DataBlock, Flip, ImageBlock, PILImageBW, Pipeline

from conftest import run_fastunet
from fastunet.learner.multilabel import MultiLabelDice, MultiLabelMaskBlock, MultiLabelMasks, dice_scores
from fastunet.learner.synthetic import make_synthetic_dataset
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.records import load_fold_records, out_of_fold
from fastunet.pipeline.splits import make_folds
from fastunet.pipeline.submission import ARGMAX_THRESHOLDS, DEFAULT_CLASSIFIER_THRESHOLDS, apply_threshold, argmax_class_probabilities, rle_decode, search_class_thresholds
from fastunet.pipeline.training import train_folds
from fastunet.pipeline.data_folder import list_images
from fastunet.pipeline.prediction import run_prediction
from fastunet.pipeline.workflow import run_training

LABELS = ['1', '2', '3']


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = run_fastunet(*args)         # in this process: a second interpreter's imports cost seconds a call
    if ok: assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope='module')
def labelled(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp('multilabel'), n_images=16, size=(48, 48), labels=3, seed=2)


@pytest.fixture(scope='module')
def multilabel_run(labelled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('multilabel_run')
    cli('train', str(labelled), '--out', str(out), '--arch', 'resnet10t', '--folds', '2', '--epochs', '2', '--bs', '4', '--multilabel')
    return out


def test_train_multilabel_records_a_sigmoid_per_label_and_their_thresholds(multilabel_run, labelled):
    models = multilabel_run / 'models'
    records = load_fold_records(models)
    assert all(r['n_out'] == 3 and r['activation'] == 'sigmoid' and r['monitor'] == 'multilabel_dice' for r in records)
    df = pd.read_csv(multilabel_run / 'folds.csv')
    oof = torch.from_numpy(out_of_fold(models, len(df)).astype(np.float32))
    assert oof.shape == (16, 3, 48, 48)
    truths = torch.stack([torch.from_numpy(MultiLabelMasks(LABELS).labels(labelled / p)) for p in df['item']])
    thresholds, min_areas, score = search_class_thresholds(oof, truths, min_areas=(0, 10, 25, 50))
    chosen = json.loads((models / 'threshold.json').read_text())
    assert (chosen['labels'], chosen['thresholds'], chosen['min_areas']) == (LABELS, thresholds, min_areas)
    assert json.loads((multilabel_run / 'report.json').read_text())['oof_dice'] == pytest.approx(score)


def expected_masks(models: Path, images: list[Path]) -> torch.Tensor:
    "What a multi-label submission must hold: the ensemble's sigmoids, each label at its own threshold and minimum area."
    chosen = json.loads((models / 'threshold.json').read_text())
    probs = FoldEnsemble.from_dir(models, device='cpu').predict(images, bs=4, progress=False)
    return torch.stack([apply_threshold(probs[:, c], chosen['thresholds'][c], chosen['min_areas'][c]) for c in range(3)], 1)


@pytest.mark.slow
def test_predict_multilabel_rows_per_image_and_label_or_a_column_per_label(multilabel_run, labelled, tmp_path):
    models, images = multilabel_run / 'models', list_images(labelled / 'images')
    masks = expected_masks(models, images)
    long_csv, wide_csv = tmp_path / 'long.csv', tmp_path / 'wide.csv'
    cli('predict', str(models), str(labelled / 'images'), '--out', str(long_csv), '--header', 'ImageId_ClassId,EncodedPixels')
    cli('predict', str(models), str(labelled / 'images'), '--out', str(wide_csv), '--wide', '--id-with-suffix')
    long, wide = pd.read_csv(long_csv, keep_default_na=False, dtype=str), pd.read_csv(wide_csv, keep_default_na=False, dtype=str)
    assert list(long.columns) == ['ImageId_ClassId', 'EncodedPixels'] and list(wide.columns) == ['id', *LABELS]
    assert list(long['ImageId_ClassId']) == [f'{p.stem}_{label}' for p in images for label in LABELS]
    assert list(wide['id']) == [p.name for p in images]                     # '0000.png', as Severstal's 'x.jpg'
    for i in range(len(images)):
        for c, label in enumerate(LABELS):
            np.testing.assert_array_equal(rle_decode(long['EncodedPixels'][3 * i + c], (48, 48)), masks[i, c].numpy())
            np.testing.assert_array_equal(rle_decode(wide[label][i], (48, 48)), masks[i, c].numpy())
    assert (masks.sum(1) > 1).any() or masks.sum() == 0      # overlapping labels are allowed to overlap
    result = cli('predict', str(models), str(labelled / 'images'), '--out', str(tmp_path / 'x.csv'), '--header', 'a,b,c', ok=False)
    assert result.returncode == 1 and "--header names 3 column(s), ['a', 'b', 'c'], but the rows have 2" in result.stderr
    result = cli('predict', str(models), str(labelled / 'images'), '--out', str(tmp_path / 'x.csv'), '--tile', '32', ok=False)
    assert result.returncode == 1 and '--tile does not predict multi-label models' in result.stderr
    assert not (tmp_path / 'x.csv').exists()


def test_multilabel_arguments_are_checked_against_the_label_folders(labelled, tmp_path):
    with pytest.raises(ValueError, match=r"--classes 2, but '.*masks' holds 3 label folder\(s\), \['1', '2', '3'\]"):
        run_training(labelled, tmp_path / 'a', arch='resnet10t', n_folds=2, epochs=1, lr=1e-3, bs=4, seed=0, classes=2, multilabel=True)
    flat = make_synthetic_dataset(tmp_path / 'flat', n_images=4, size=(32, 32))
    with pytest.raises(FileNotFoundError, match='--multilabel reads one folder of masks per label'):
        run_training(flat, tmp_path / 'b', arch='resnet10t', n_folds=2, epochs=1, lr=1e-3, bs=4, seed=0, multilabel=True)
    missing = next((labelled / 'masks' / '2').iterdir())
    content = missing.read_bytes()
    missing.unlink()
    try:
        with pytest.raises(ValueError, match=f"no mask for .*{missing.stem}"):
            run_training(labelled, tmp_path / 'c', arch='resnet10t', n_folds=2, epochs=1, lr=1e-3, bs=4, seed=0, multilabel=True)
    finally: missing.write_bytes(content)
    assert not (tmp_path / 'c' / 'models').exists()


def test_train_folds_takes_a_multilabel_datablock(labelled, tmp_path):
    "The Python path: a DataBlock with MultiLabelMaskBlock, checked (its packed codes accepted) and trained by train_folds."
    images = list_images(labelled / 'images')
    dblock = DataBlock(blocks=(ImageBlock(PILImageBW), MultiLabelMaskBlock(LABELS)), get_x=ColReader('item'),
                       get_y=Pipeline([ColReader('item'), MultiLabelMasks(LABELS)]), batch_tfms=[Flip()])
    df = make_folds([str(p) for p in images], n_folds=2, seed=0)
    cv = train_folds(dblock, df, 'resnet10t', tmp_path, epochs=1, bs=4, seed=0, monitor='multilabel_dice',
                     dls_kwargs=dict(num_workers=0), learner_kwargs=dict(pretrained=False, metrics=MultiLabelDice()))
    assert len(cv) == 2
    record = load_fold_records(tmp_path)[0]
    assert record['n_out'] == 3 and record['activation'] == 'sigmoid'
    assert out_of_fold(tmp_path, len(df)).shape == (16, 3, 48, 48)


def test_multiclass_softmax_end_to_end_with_per_class_thresholds_and_a_column_per_class(tmp_path):
    data = make_synthetic_dataset(tmp_path / 'data', n_images=12, size=(48, 48), n_classes=3, seed=4)
    models = tmp_path / 'run' / 'models'
    report = run_training(data, tmp_path / 'run', arch='resnet10t', n_folds=2, epochs=2, lr=3e-3, bs=4, seed=0, classes=3)
    chosen = json.loads((models / 'threshold.json').read_text())
    # the thresholds and minimum areas of classes 1 and 2, recomputed from the out-of-fold softmax and the masks
    folds = pd.read_csv(tmp_path / 'run' / 'folds.csv')
    codes = torch.stack([torch.from_numpy(np.array(Image.open(data / 'masks' / Path(item).name))) for item in folds['item']])
    won = argmax_class_probabilities(torch.from_numpy(out_of_fold(models, len(folds)).astype(np.float32)))
    thresholds, min_areas, score = search_class_thresholds(won, torch.stack([codes == c for c in (1, 2)], 1),
                                                           thresholds=ARGMAX_THRESHOLDS, min_areas=(0, 10, 25, 50))
    assert (chosen['thresholds'], chosen['min_areas']) == (thresholds, min_areas)
    assert report['oof_dice'] == pytest.approx(score)
    images = list_images(data / 'images')
    probs = FoldEnsemble.from_dir(models, device='cpu').predict(images, bs=4, progress=False)
    won = argmax_class_probabilities(probs)
    csv = run_prediction(models, images, tmp_path / 'wide.csv', wide=True, bs=4)
    wide = pd.read_csv(csv, keep_default_na=False, dtype=str)
    assert list(wide.columns) == ['id', '1', '2']
    for i in range(len(images)):
        for c in (1, 2):
            expected = apply_threshold(won[i, c - 1][None], thresholds[c - 1], min_areas[c - 1])[0]
            np.testing.assert_array_equal(rle_decode(wide[str(c)][i], (48, 48)), expected.numpy())
    # --threshold 0 --min-area 0: the plain argmax, as before thresholds were chosen (and for a run without threshold.json)
    plain = pd.read_csv(run_prediction(models, images, tmp_path / 'plain.csv', threshold=0., min_area=0, bs=4), keep_default_na=False, dtype=str)
    (models / 'threshold.json').unlink()
    assert pd.read_csv(run_prediction(models, images, tmp_path / 'old.csv', bs=4), keep_default_na=False, dtype=str).equals(plain)
    for i, image in enumerate(images):
        for c in (1, 2):
            row = plain.set_index('id').loc[f'{image.stem}_{c}', 'rle_mask']
            np.testing.assert_array_equal(rle_decode(row, (48, 48)), (probs[i].argmax(0) == c).numpy())
    with pytest.raises(ValueError, match='--threshold and --min-area with --tile apply to binary models'):
        run_prediction(models, images, tmp_path / 'x.csv', threshold=0.3, tile=32)
    (models / 'threshold.json').write_text(json.dumps(dict(thresholds=[0.1], min_areas=[0, 0])))
    with pytest.raises(ValueError, match=r'thresholds and min_areas must be lists of 2 values, one per class'):
        run_prediction(models, images, tmp_path / 'y.csv', bs=4)


@pytest.mark.slow
def test_multiclass_with_the_empty_mask_classifier_chooses_and_applies_its_threshold(tmp_path):
    data = make_synthetic_dataset(tmp_path / 'data', n_images=16, size=(48, 48), n_classes=3, seed=4, empty_fraction=0.25)
    models = tmp_path / 'run' / 'models'
    run_training(data, tmp_path / 'run', arch='resnet10t', n_folds=2, epochs=6, lr=1e-2, bs=4, seed=0, classes=3, classifier=True)
    chosen = json.loads((models / 'threshold.json').read_text())
    assert chosen['classifier_threshold'] in DEFAULT_CLASSIFIER_THRESHOLDS and len(chosen['thresholds']) == 2
    images = list_images(data / 'images')
    ungated = FoldEnsemble.from_dir(models, device='cpu', classifier_threshold=0.)
    probs = ungated.predict(images, bs=4, progress=False)
    batch = torch.stack([torch.from_numpy(np.array(Image.open(p)))[None] for p in images])
    nonempty = ungated.nonempty_probabilities(batch)
    read = lambda path: pd.read_csv(path, keep_default_na=False, dtype=str).set_index('id')
    argmax = dict(threshold=0., min_area=0, bs=4)      # the plain argmax: every class's pixels, however little the model learnt
    cut = float(nonempty.sort().values[len(images) // 2])              # about half the images below it
    for name, gate, expected_cut in (('chosen', {}, chosen['classifier_threshold']), ('cut', dict(classifier_threshold=cut), cut),
                                     ('off', dict(classifier_threshold=0.), 0.)):
        rows = read(run_prediction(models, images, tmp_path / f'{name}.csv', **argmax, **gate))
        for i, image in enumerate(images):
            kept = bool(nonempty[i] >= expected_cut)
            for c in (1, 2):
                expected = (probs[i].argmax(0) == c) & kept
                np.testing.assert_array_equal(rle_decode(rows.loc[f'{image.stem}_{c}', 'rle_mask'], (48, 48)), expected.numpy())
    assert (nonempty < cut).any() and (nonempty >= cut).any()
    assert (read(tmp_path / 'off.csv').rle_mask != '').any()          # six epochs: some class wins some pixels


def test_dice_scores_count_empty_against_empty_as_one():
    pred = torch.zeros(3, 4, 4, dtype=torch.bool); truth = pred.clone()
    pred[1, :2] = True; truth[1, :1] = True; truth[2, 0, 0] = True
    assert dice_scores(pred, truth).tolist() == pytest.approx([1.0, 2 * 4 / (8 + 4), 0.0])
