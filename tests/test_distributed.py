"""Beyond one process: DDP under torchrun (two CPU processes, gloo), `fastunet train` data-parallel through
fastai's `distrib_ctx`, and folds trained concurrently by separate processes into one folder."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import console_script, fastunet_command
from fastunet.pipeline.data_folder import segmentation_block
from fastunet.learner.synthetic import make_synthetic_dataset
from fastunet.pipeline.records import load_fold_records

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_ddp_gives_every_option_the_same_gradients_on_both_ranks(tmp_path):
    out = tmp_path / 'ddp.jsonl'
    run([console_script('torchrun'), '--standalone', '--nproc_per_node', '2', str(HERE / 'ddp_worker.py'), str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 13
    for row in rows:
        assert row['grad_norm'] > 0, row
        assert row['max_local_grad_difference'] > 1e-4, row      # the ranks saw different data...
        assert row['max_grad_difference'] < 1e-6, row            # ...and DDP averaged their gradients
        assert row['max_param_difference'] < 1e-6, row


@pytest.fixture(scope='module')
def small_salt(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp('salt'), n_images=24, size=(64, 64), seed=3)


def _validate(out: Path, fold: int) -> tuple[float, np.ndarray]:
    "The TGS metric and probabilities of a saved fold on its held-out images, computed in this single process."
    from fastai.data.transforms import IndexSplitter
    from fastunet.learner.unet_learner import more_dynamic_unet_learner
    from fastunet.learner.metrics import TGSMetric
    from fastunet.learner.losses import BCELovaszLoss
    record = json.loads((out / 'models' / f'fold_{fold}.json').read_text())
    data = Path(json.loads((out / 'models' / 'run.json').read_text())['definition']['data'])
    df = pd.read_csv(out / 'folds.csv')                    # paths inside the data folder
    df['item'] = [str(data / item) for item in df['item']]
    block = segmentation_block(1)
    block.splitter = IndexSplitter(record['valid_index'])
    dls = block.dataloaders(df, bs=4, num_workers=0)
    heads = {k: record['config'][k] for k in ('deep_supervision', 'classifier')}
    learn = more_dynamic_unet_learner(dls, record['arch'], n_out=1, pretrained=False, loss_func=BCELovaszLoss(),
                                      metrics=[TGSMetric()], **heads)
    from fastunet.pipeline.fold_weights import read_fold_weights      # a fold's weights, with their identity
    learn.model.load_state_dict(read_fold_weights(out / 'models' / f'fold_{fold}.pth')[0])
    probs = torch.sigmoid(learn.get_preds(dl=dls.valid, act=lambda x: x)[0])
    return learn.validate()[1], probs.numpy()


def test_fastunet_train_under_torchrun_trains_data_parallel_and_rank0_writes(small_salt, tmp_path):
    out = tmp_path / 'run'
    result = run([console_script('torchrun'), '--standalone', '--nproc_per_node', '2', fastunet_command(), 'train', str(small_salt),
                  '--out', str(out), '--arch', 'resnet10t', '--folds', '3', '--fold', '0', '--epochs', '2', '--bs', '4',
                  '--deep-supervision', '--classifier', '--ema', '0.9'])
    assert result.stdout.count('train_loss') == 1 and result.stdout.count('best_epoch') == 1   # rank 0 alone logs and prints
    models = out / 'models'
    assert sorted(p.name for p in models.iterdir()) == ['fold_0.json', 'fold_0.pth', 'fold_0_oof.npy', 'run.json']   # no temp files
    record = json.loads((models / 'fold_0.json').read_text())
    # the monitored metric and the out-of-fold predictions were gathered from both ranks, in order: they are
    # those of the whole held-out set, as one process computes them with the saved weights (EMA's, which validated)
    assert record['ema'] == 0.9 and len(record['oof_nonempty']) == len(record['valid_index'])
    score, probs = _validate(out, 0)
    assert record['score'] == pytest.approx(score, abs=1e-6)
    oof = np.load(models / 'fold_0_oof.npy').astype(np.float32)
    assert oof.shape == (len(record['valid_index']), 1, 64, 64)
    np.testing.assert_allclose(oof, probs, atol=2e-3)


def test_two_folds_trained_concurrently_by_two_processes_do_not_clash(small_salt, tmp_path):
    out = tmp_path / 'run'
    command = [fastunet_command(), 'train', str(small_salt), '--out', str(out), '--arch', 'resnet10t', '--folds', '2',
               '--epochs', '1', '--bs', '4']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    processes = [subprocess.Popen(command + ['--fold', str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for k in (0, 1)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    names = sorted(p.name for p in (out / 'models').iterdir())
    assert names == ['fold_0.json', 'fold_0.pth', 'fold_0_oof.npy', 'fold_1.json', 'fold_1.pth', 'fold_1_oof.npy',
                     'run.json', 'threshold.json']                    # the last to finish chose the threshold
    assert sorted(r['fold'] for r in load_fold_records(out / 'models')) == [0, 1]
    assert not list(out.glob('.*.tmp'))
    images = small_salt / 'images'
    run([fastunet_command(), 'predict', str(out / 'models'), str(images), '--out', str(tmp_path / 'submission.csv')])
    assert len(pd.read_csv(tmp_path / 'submission.csv')) == len(list(images.glob('*.png')))
