"""`fastunet train --loss` and `--loss-after` (issue 27, losses): every loss name trains for every task it fits, a weighted
sum is the weighted sum of its parts, the schedule switches at its epoch (with the heads, and on resume), and the run's
definition changes with the loss spec and stays what it was without one. Tiny: resnet10t, 32 px, 8 images, 2 folds."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fastai.losses import CrossEntropyLossFlat, DiceLoss, FocalLossFlat

from conftest import run_cli
from fastunet.learner.losses import LovaszHingeLoss, LovaszSoftmaxLoss, SymmetricLovaszLoss
from fastunet.learner.loss_spec import LOSS_NAMES, LossSchedule, make_loss, parse_loss, sigmoid_bce, sigmoid_dice, sigmoid_focal
from fastunet.learner.synthetic import make_synthetic_dataset
from fastunet.pipeline.records import fold_paths, read_run
from fastunet.pipeline.state import read_fold_record
from fastunet.pipeline.task import Task
from fastunet.pipeline.workflow import run_training

TRAIN = dict(arch='resnet10t', n_folds=2, epochs=1, lr=3e-3, bs=4, seed=0)
TASK_OPTIONS = {'binary': {}, 'classes': {'classes': 3}, 'multilabel': {'multilabel': True}}


@pytest.fixture(scope='module')
def task_data(tmp_path_factory) -> dict[str, Path]:
    "A small data set for each kind of task (8 images of 32 px): binary masks, three classes, two overlapping labels."
    root = tmp_path_factory.mktemp('loss_data')
    return {'binary': make_synthetic_dataset(root / 'binary', n_images=8, size=(32, 32), seed=3),
            'classes': make_synthetic_dataset(root / 'classes', n_images=8, size=(32, 32), n_classes=3, seed=4),
            'multilabel': make_synthetic_dataset(root / 'multilabel', n_images=8, size=(32, 32), labels=2, seed=3)}


def definition(run: Path) -> dict: return read_run(run / 'models')['definition']


def fold_record(run: Path, fold: int): return read_fold_record(fold_paths(run / 'models', fold)['record'])


@pytest.mark.parametrize('name, kind', [(name, kind) for name, (_, kinds) in LOSS_NAMES.items() for kind in kinds])
def test_each_loss_trains_for_each_task_it_fits(task_data, tmp_path, name, kind):
    report = run_training(task_data[kind], tmp_path / 'run', loss=name, **TRAIN, **TASK_OPTIONS[kind])
    assert len(report['cv']) == 2 and all(math.isfinite(row['score']) for row in report['cv']), report
    assert definition(tmp_path / 'run')['learner']['loss_func'] == name
    expected = 'softmax' if kind == 'classes' else 'sigmoid'
    assert all(fold_record(tmp_path / 'run', fold).activation == expected for fold in (0, 1))


_BATCHES = {'binary': (torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), (torch.arange(128).reshape(2, 8, 8) % 3 == 0).long()),
            'classes': (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(128).reshape(2, 8, 8) % 3),
            'multilabel': (torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2)),
                           (torch.arange(256).reshape(2, 2, 8, 8) % 5 < 2).float())}


@pytest.mark.parametrize('kind, spec, parts', [
    ('binary', 'bce:0.25+lovasz:0.75', [(0.25, sigmoid_bce), (0.75, LovaszHingeLoss())]),
    ('binary', 'dice:2+focal:0.5+symmetric-lovasz', [(2, sigmoid_dice), (0.5, sigmoid_focal), (1, SymmetricLovaszLoss())]),
    ('classes', 'ce:0.3+lovasz-softmax:0.7+dice+focal:2',
     [(0.3, CrossEntropyLossFlat(axis=1)), (0.7, LovaszSoftmaxLoss()), (1, DiceLoss(axis=1, reduction='mean')), (2, FocalLossFlat(axis=1))]),
    ('multilabel', 'bce:0.5+lovasz:1.5',
     [(0.5, sigmoid_bce), (1.5, lambda x, y: LovaszHingeLoss()(x.flatten(0, 1), y.flatten(0, 1).long()))]),
])
def test_a_weighted_sum_is_the_weighted_sum_of_its_parts(kind, spec, parts):
    outputs, targets = _BATCHES[kind]
    expected = sum(weight * part(outputs, targets).as_subclass(torch.Tensor) for weight, part in parts)
    torch.testing.assert_close(make_loss(spec, kind)(outputs, targets), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(make_loss(spec, Task.classes(3) if kind == 'classes' else kind)(outputs, targets), expected)


def test_a_spec_reads_back_in_one_spelling():
    assert str(parse_loss(' BCE:0.250 + Symmetric_Lovasz:0.75 ')) == 'bce:0.25+symmetric-lovasz:0.75'
    assert str(parse_loss('focal:1+dice')) == 'dice+focal'              # the terms in one order too: the same loss, the same run


@pytest.mark.parametrize('kind, heads', [('binary', ['--deep-supervision', '--classifier']), ('classes', ['--classifier']),
                                         ('multilabel', ['--deep-supervision'])])
def test_the_schedule_switches_at_its_epoch_with_the_heads(task_data, tmp_path, capsys, kind, heads):
    flags = {'binary': [], 'classes': ['--classes', '3'], 'multilabel': ['--multilabel']}[kind]
    first, later = {'binary': ('bce:0.25+lovasz:0.75', 'symmetric-lovasz'), 'classes': ('ce:0.5+dice:0.5', 'lovasz-softmax'),
                    'multilabel': ('bce+dice', 'lovasz')}[kind]
    run = tmp_path / 'run'
    code, err = run_cli(['train', str(task_data[kind]), '--out', str(run), '--arch', 'resnet10t', '--folds', '2', '--epochs', '3',
                         '--bs', '4', '--seed', '0', '--loss', first, '--loss-after', f'2:{later}', *flags, *heads], capsys)
    assert code == 0, err
    first = str(parse_loss(first))                                     # 'ce:0.5+dice:0.5' reads back as 'dice:0.5+ce:0.5'
    for fold in (0, 1):
        assert fold_record(run, fold).loss_schedule == {'after': 2, 'losses': [first, first, later]}
        assert len(fold_record(run, fold).history) == 3
    assert definition(run)['loss_after'] == [2, later] and definition(run)['learner']['loss_func'] == first


def test_the_schedule_switches_from_the_task_loss_and_again_when_a_run_resumes(task_data, tmp_path):
    options = dict(TRAIN, epochs=2, loss_after=(1, 'lovasz'))
    run_training(task_data['binary'], tmp_path / 'run', fold=0, **options)        # one fold now, the other on resume
    assert not fold_paths(tmp_path / 'run' / 'models', 1)['record'].exists()
    run_id = read_run(tmp_path / 'run' / 'models')['run_id']
    report = run_training(task_data['binary'], tmp_path / 'run', **options)
    assert len(report['cv']) == 2 and read_run(tmp_path / 'run' / 'models')['run_id'] == run_id
    for fold in (0, 1):
        assert fold_record(tmp_path / 'run', fold).loss_schedule == {'after': 1, 'losses': ['BCELovaszLoss', 'lovasz']}


def test_the_definition_changes_with_the_loss_spec_and_not_without_one(task_data, tmp_path):
    run = tmp_path / 'run'
    run_training(task_data['binary'], run, **TRAIN)
    plain = definition(run)
    assert plain['learner']['loss_func'] == 'BCELovaszLoss' and 'loss_after' not in plain      # as before --loss existed
    assert fold_record(run, 0).loss_schedule is None
    with pytest.raises(ValueError, match=r"holds a run made with other arguments .*bce:0\.25\+lovasz:0\.75"):
        run_training(task_data['binary'], run, loss='bce:0.25+lovasz:0.75', **TRAIN)
    run_training(task_data['binary'], run, loss='bce:0.25+lovasz:0.75', restart=True, **TRAIN)
    weighted = read_run(run / 'models')
    run_training(task_data['binary'], run, loss='BCE:0.250+lovasz:0.75', **TRAIN)           # one loss, two spellings: it resumes
    assert read_run(run / 'models')['run_id'] == weighted['run_id']
    with pytest.raises(ValueError, match='holds a run made with other arguments'):
        run_training(task_data['binary'], run, loss='bce:0.5+lovasz:0.75', **TRAIN)
    with pytest.raises(ValueError, match='holds a run made with other arguments'):
        run_training(task_data['binary'], run, loss='bce:0.25+lovasz:0.75', loss_after=(1, 'lovasz'), **dict(TRAIN, epochs=2))


def test_python_users_build_the_same_loss():
    loss = make_loss('bce:0.25+lovasz:0.75', Task.binary())
    assert loss.__name__ == 'bce:0.25+lovasz:0.75' and repr(loss) == "WeightedLoss('bce:0.25+lovasz:0.75', binary)"
    assert torch.equal(loss.decodes(torch.tensor([[[[0.2, 0.7]]]])), torch.tensor([[[0, 1]]]))
    schedule = LossSchedule(10, make_loss('lovasz', 'binary'))
    assert schedule.record() == {'after': 10, 'losses': []}
    assert json.dumps(schedule.record())
