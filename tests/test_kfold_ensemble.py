"""k-fold training that resumes after an interruption, progressive resizing, and the fold ensemble."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.vision.all import ColReader, DataBlock, ImageBlock, MaskBlock, PILImageBW, Pipeline, Resize

from fastunet.learner.data import MaskFromFolder, image_tensor
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.splits import make_folds
from fastunet.pipeline.records import cv_table, fold_paths, out_of_fold
from fastunet.pipeline.training import train_folds

LEARNER = dict(pretrained=False)
DLS = dict(num_workers=0)


def salt_block(size=None):
    return DataBlock(blocks=(ImageBlock(PILImageBW), MaskBlock(['bg', 'salt'])), get_x=ColReader('item'),
                     get_y=Pipeline([ColReader('item'), MaskFromFolder()]), item_tfms=[Resize(size)] if size else [])


@pytest.fixture(scope='module')
def salt_folds(data_factory):
    path = data_factory(1, 2, size=(64, 64), n_images=12)
    return make_folds([str(p) for p in sorted((path / 'images').glob('*.png'))], n_folds=2, seed=0)


class InterruptSecondFit(Callback):
    "Stands for a user pressing Ctrl-C during the second fold."
    def __init__(self): self.fits = 0
    def before_fit(self):
        self.fits += 1
        if self.fits == 2: raise KeyboardInterrupt


@pytest.fixture(scope='module')
def trained(salt_folds, tmp_path_factory):
    out = tmp_path_factory.mktemp('folds')
    train_folds(salt_block(), salt_folds, 'resnet10t', out, epochs=2, bs=4, dls_kwargs=DLS, learner_kwargs=LEARNER)
    return out


def test_interrupted_run_resumes(salt_folds, tmp_path):
    block = salt_block()
    splitter = block.splitter
    with pytest.raises(KeyboardInterrupt):
        train_folds(block, salt_folds, 'resnet10t', tmp_path, epochs=1, bs=4, dls_kwargs=DLS, learner_kwargs=LEARNER,
                    cbs=[InterruptSecondFit()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['fold_0.json', 'fold_0.pth', 'fold_0_oof.npy', 'run.json']   # no temporary files
    finished = (tmp_path / 'fold_0.pth').stat().st_mtime_ns
    cv = train_folds(salt_block(), salt_folds, 'resnet10t', tmp_path, epochs=1, bs=4, dls_kwargs=DLS, learner_kwargs=LEARNER)
    assert list(cv.fold) == [0, 1]
    assert (tmp_path / 'fold_0.pth').stat().st_mtime_ns == finished       # fold 0 was not trained again
    assert block.splitter is splitter                                     # the caller's DataBlock is not changed


def test_records_and_out_of_fold(trained, salt_folds):
    record = json.loads((trained / 'fold_1.json').read_text())
    assert record['arch'] == 'resnet10t' and record['n_in'] == 1 and record['n_out'] == 2
    assert record['activation'] == 'softmax'                  # what CrossEntropyLossFlat's get_preds applies
    assert record['best_epoch'] in (0, 1) and record['monitor'] == 'valid_loss' and np.isfinite(record['score'])
    assert set(record['versions']) == {'fastunet', 'torch', 'fastai', 'timm'}
    assert record['valid_index'] == list(np.flatnonzero(salt_folds.fold.values == 1))
    oof = out_of_fold(trained, len(salt_folds))
    assert oof.shape == (12, 2, 64, 64) and oof.dtype == np.float16
    np.testing.assert_array_equal(oof[record['valid_index']], np.load(fold_paths(trained, 1)['oof']))
    np.testing.assert_allclose(oof.astype(np.float32).sum(1), 1, atol=2e-3)     # every item predicted, by its own fold


class CaptureStart(Callback):
    def before_fit(self): self.start = {k: v.clone() for k, v in self.learn.model.state_dict().items()}


def test_progressive_resizing_starts_from_the_saved_fold(trained, salt_folds, tmp_path):
    capture = CaptureStart()
    train_folds(salt_block(96), salt_folds, 'resnet10t', tmp_path, epochs=1, bs=4, folds=[0], init_dir=trained,
                dls_kwargs=DLS, learner_kwargs=LEARNER, cbs=[capture])
    from fastunet.pipeline.fold_weights import read_fold_weights      # a fold's weights, with their identity
    saved = read_fold_weights(fold_paths(trained, 0)['weights'])[0]
    assert all(torch.equal(capture.start[k], v) for k, v in saved.items())
    assert list(cv_table(tmp_path).fold) == [0]
    assert np.load(fold_paths(tmp_path, 0)['oof']).shape[-2:] == (96, 96)


def test_ensemble_averages_folds_with_flip_tta(trained, salt_folds):
    ensemble = FoldEnsemble.from_dir(trained, device='cpu')
    images = list(salt_folds['item'][:5])
    probs = ensemble.predict(images, bs=2, progress=False)
    assert probs.shape == (5, 2, 64, 64)
    x = torch.stack([image_tensor(p, 1) for p in images])
    expected = sum((torch.softmax(m(x), 1) + torch.softmax(m(x.flip(-1)), 1).flip(-1)) / 2 for m in ensemble.models) / 2
    torch.testing.assert_close(probs, expected.detach(), rtol=1e-4, atol=1e-5)
    no_tta = ensemble.predict(images, tta=False, progress=False)
    assert not torch.allclose(no_tta, probs)
    resized = ensemble.predict(images[:2], size=(32, 32), progress=False)
    assert resized.shape == (2, 2, 64, 64)


def test_ensemble_streams(trained, salt_folds):
    "predict_iter is lazy: an endless source of images yields results batch by batch (memory bounded by the batch)."
    ensemble = FoldEnsemble.from_dir(trained, device='cpu')
    endless = itertools.cycle(list(salt_folds['item']))
    first = list(itertools.islice(ensemble.predict_iter(endless, bs=3, progress=False), 4))
    assert len(first) == 4 and first[0][1].shape == (2, 64, 64)


def copy_folds(source, dest):
    dest.mkdir(exist_ok=True)
    for p in source.iterdir(): (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_ensemble_refuses_disagreeing_folds(trained, tmp_path):
    folder = copy_folds(trained, tmp_path / 'models')
    record = json.loads((folder / 'fold_1.json').read_text())
    record['config']['upsample'] = 'pixel_shuffle'
    (folder / 'fold_1.json').write_text(json.dumps(record))
    with pytest.raises(ValueError, match="fold 1 and fold 0 disagree on 'config'"):
        FoldEnsemble.from_dir(folder)


def test_ensemble_reports_missing_and_corrupt_files(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match='no fold records'):
        FoldEnsemble.from_dir(tmp_path)
    folder = copy_folds(trained, tmp_path / 'corrupt_record')
    (folder / 'fold_0.json').write_text('{"fold": 0, ')
    with pytest.raises(ValueError, match='not valid JSON'):
        FoldEnsemble.from_dir(folder)
    folder = copy_folds(trained, tmp_path / 'missing_weights')
    (folder / 'fold_1.pth').unlink()
    with pytest.raises(FileNotFoundError, match='has a record but no weights'):
        FoldEnsemble.from_dir(folder)
    folder = copy_folds(trained, tmp_path / 'corrupt_weights')
    (folder / 'fold_1.pth').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='do not load'):
        FoldEnsemble.from_dir(folder)


def test_ensemble_refuses_wrong_channel_count(trained):
    ensemble = FoldEnsemble.from_dir(trained, device='cpu')
    with pytest.raises(ValueError, match='1-channel images'):
        ensemble.predict([np.zeros((64, 64, 3), dtype=np.uint8)], progress=False)


def test_binary_folds_record_sigmoid_and_the_ensemble_applies_it(salt_folds, tmp_path):
    "One rule for probabilities: the learner's loss decides (here sigmoid), the record says so, the ensemble obeys."
    from fastunet.learner.losses import BCELovaszLoss
    train_folds(salt_block(), salt_folds, 'resnet10t', tmp_path, epochs=1, bs=4, folds=[0], dls_kwargs=DLS,
                learner_kwargs=dict(pretrained=False, n_out=1, loss_func=BCELovaszLoss()))
    assert json.loads((tmp_path / 'fold_0.json').read_text())['activation'] == 'sigmoid'
    ensemble = FoldEnsemble.from_dir(tmp_path, device='cpu', folds=[0])      # the one fold trained, asked for by name
    images = list(salt_folds['item'][:3])
    x = torch.stack([image_tensor(p, 1) for p in images])
    model = ensemble.models[0]
    with torch.no_grad(): expected = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1)) / 2
    torch.testing.assert_close(ensemble.predict(images, progress=False), expected, rtol=1e-4, atol=1e-5)
