"""The `fastunet` command end to end: its help, the demo on generated data, and train + predict on ISBI 2012. The
submissions are checked against the fold ensemble's own predictions, so a wrong row cannot pass."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastunet.cli import main
from fastunet.learner.data import MaskFromFolder
from fastunet.learner.metrics import tgs_scores
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.submission import apply_threshold, rle_decode
from fastunet.pipeline.data_folder import list_images

from conftest import ISBI, fastunet_command, run_cli, run_fastunet


def test_cli_help(capsys, monkeypatch):
    out = subprocess.run([fastunet_command(), '--help'], capture_output=True, text=True).stdout
    assert 'demo' in out and 'train' in out and 'predict' in out
    for command, flags in (('demo', ['--epochs', '--arch', '--folds']), ('train', ['--binary-masks', '--fold'])):
        monkeypatch.setattr(sys, 'argv', ['fastunet', command, '--help'])    # in this process: no second import of torch
        with pytest.raises(SystemExit): main()
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), out
    result = subprocess.run([fastunet_command(), 'nonsense'], capture_output=True, text=True)
    assert result.returncode == 2


def submission_rows(path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == 'id,rle_mask'
    return [tuple(line.split(',')) for line in lines[1:]]


def ensemble_masks(models, images, threshold: float, min_area: int, bs: int = 4) -> torch.Tensor:
    "What the submission must hold: the fold ensemble's flip-TTA probabilities, thresholded."
    probs = FoldEnsemble.from_dir(models, device='cpu').predict(images, bs=bs, progress=False)[:, -1]
    return apply_threshold(probs, threshold, min_area)


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    dest = tmp_path / 'demo'
    result = subprocess.run([fastunet_command(), 'demo', '--dest', str(dest), '--n-images', '24', '--n-test', '7',
                             '--folds', '2', '--epochs', '1', '--size', '64', '--bs', '4'], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'writing data, models, submission.csv, report.json and predictions.png to {dest}' in result.stdout
    assert re.search(r'test TGS metric: \d\.\d+ without TTA, \d\.\d+ with flip TTA', result.stdout), result.stdout[-2000:]
    report = json.loads((dest / 'report.json').read_text())
    assert [row['fold'] for row in report['cv']] == [0, 1]
    chosen = json.loads((dest / 'models' / 'threshold.json').read_text())
    assert (chosen['threshold'], chosen['min_area']) == (report['threshold'], report['min_area'])

    test_images = list_images(dest / 'data' / 'test' / 'images')
    masks = ensemble_masks(dest / 'models', test_images, report['threshold'], report['min_area'])
    rows = submission_rows(dest / 'submission.csv')
    assert [image_id for image_id, _ in rows] == [p.stem for p in test_images]
    for (_, rle), mask in zip(rows, masks): np.testing.assert_array_equal(rle_decode(rle, (64, 64)), mask.numpy())
    truths = torch.from_numpy(np.stack([MaskFromFolder().array(p) for p in test_images])) > 0
    assert tgs_scores(masks, truths).mean().item() == pytest.approx(report['test_tgs_with_tta'])

    assert (dest / 'predictions.png').read_bytes()[:4] == b'\x89PNG'
    assert sorted(p.name for p in (dest / 'models').glob('fold_*.json')) == ['fold_0.json', 'fold_1.json']
    assert not list(tmp_path.rglob('*.tmp')), 'temporary files left behind'


@pytest.mark.slow
@pytest.mark.skipif(not ISBI.exists(), reason=f'ISBI 2012 data not found at {ISBI} (see shared/data/README.md)')
def test_train_and_predict_on_isbi(tmp_path):
    result = run_fastunet('train', str(ISBI), '--out', str(tmp_path), '--arch', 'resnet10t', '--folds', '2',      # in this process
                          '--epochs', '1', '--crop', '128', '--bs', '4', '--mask-folder', 'labels', '--binary-masks')
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    assert [row['fold'] for row in report['cv']] == [0, 1] and all(np.isfinite(row['score']) for row in report['cv'])
    out, test_images = tmp_path / 'submission.csv', tmp_path / 'test_images'
    test_images.mkdir()
    for image in sorted((ISBI / 'images').glob('*.png'))[:3]: (test_images / image.name).symlink_to(image)   # a few keep it fast
    result = run_fastunet('predict', str(tmp_path / 'models'), str(test_images), '--out', str(out), '--threshold', '0.5')
    assert result.returncode == 0, result.stderr[-2000:]
    rows = submission_rows(out)
    assert [image_id for image_id, _ in rows] == ['00', '01', '02']
    masks = ensemble_masks(tmp_path / 'models', list_images(test_images), 0.5, 0)
    for (_, rle), mask in zip(rows, masks): np.testing.assert_array_equal(rle_decode(rle, (512, 512)), mask.numpy())


@pytest.mark.slow
def test_train_and_predict_a_unet_from_scratch(data_factory, tmp_path):
    "--arch unet with the paper's decoder and encoder options: trained, recorded, ensembled into a submission."
    data = data_factory(1, 2, size=(64, 64), n_images=12)
    out = tmp_path / 'run'
    train = run_fastunet('train', str(data), '--out', str(out), '--arch', 'unet', '--config', 'paper',
                         '--encoder-kwargs', '{"features": 8, "depth": 3}', '--folds', '2', '--epochs', '1', '--bs', '4')
    assert train.returncode == 0, train.stderr[-2000:]
    record = json.loads((out / 'models' / 'fold_1.json').read_text())
    assert (record['arch'], record['encoder_kwargs'], record['config']['upsample']) == ('unet', {'features': 8, 'depth': 3}, 'transposed')
    submission = tmp_path / 'submission.csv'
    predict = run_fastunet('predict', str(out / 'models'), str(data / 'images'), '--out', str(submission), '--workers', '0',
                           '--no-autocast')   # images read in-process
    assert predict.returncode == 0, predict.stderr[-2000:]
    images = list_images(data / 'images')
    chosen = json.loads((out / 'models' / 'threshold.json').read_text())
    masks = ensemble_masks(out / 'models', images, chosen['threshold'], chosen['min_area'])
    rows = submission_rows(submission)
    assert [r[0] for r in rows] == [p.stem for p in images]
    for (_, rle), mask in zip(rows, masks): assert np.array_equal(rle_decode(rle, mask.shape), mask.numpy())


@pytest.mark.parametrize('options', ['features=8', '[8, 3]'])
def test_encoder_kwargs_that_are_not_a_json_object_are_refused(data_factory, tmp_path, capsys, options):
    data = data_factory(1, 2, size=(64, 64), n_images=12)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--arch', 'unet', '--encoder-kwargs', options], capsys)
    assert code != 0 and '--encoder-kwargs must be a JSON object' in err, err
    assert not (tmp_path / 'run').exists()                                   # refused before anything was written


@pytest.mark.parametrize('options, message', [(['--config', 'papr'], "unknown config preset 'papr'"),
                                              (['--pretrained'], 'trains from scratch: leave out --pretrained')])
def test_bad_unet_options_are_refused_before_any_work(data_factory, tmp_path, capsys, options, message):
    data = data_factory(1, 2, size=(64, 64), n_images=12)
    code, err = run_cli(['train', str(data), '--out', str(tmp_path / 'run'), '--arch', 'unet', *options], capsys)
    assert code != 0 and message in err, err
    assert not (tmp_path / 'run').exists()
