"""Run folders written by fastunet 0.1.0, before runs recorded their task and thresholds had a schema
(`tests/fixtures/runs_v0_1`): today's reader takes them, and `fastunet predict` writes the rows 0.1.0 wrote."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_fastunet
from fastunet.pipeline.data_folder import list_images
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.prediction import run_prediction
from fastunet.pipeline.task import Task

RUNS = Path(__file__).parent / 'fixtures' / 'runs_v0_1'

CASES = {   # the expected submission, and the arguments 0.1.0's `fastunet predict` was given for it
    'bin/expected.csv': dict(num_workers=0),
    'bin/expected_tiled.csv': dict(tile=32, tta='d4'),
    'cls/expected.csv': dict(num_workers=0),
    'cls/expected_wide.csv': dict(wide=True, num_workers=0),
    'ml/expected.csv': dict(num_workers=0),
}


@pytest.mark.parametrize('expected', CASES)
def test_a_run_of_fastunet_0_1_predicts_the_rows_it_predicted_then(tmp_path, expected):
    run = RUNS / expected.split('/')[0]
    written = run_prediction(run / 'models', list_images(run / 'images'), tmp_path / 'submission.csv', device='cpu', **CASES[expected])
    assert written.read_text() == (RUNS / expected).read_text()


def test_the_task_of_an_older_run_is_read_from_its_records():
    tasks = {name: FoldEnsemble.from_dir(RUNS / name / 'models', device='cpu').task for name in ('bin', 'cls', 'ml')}
    assert tasks == {'bin': Task.binary(), 'cls': Task.classes(3), 'ml': Task.multilabel(['1', '2'])}


@pytest.mark.slow
def test_the_command_line_predicts_an_older_run_on_the_device_asked_for(tmp_path):
    run = Path(shutil.copytree(RUNS / 'cls', tmp_path / 'cls'))
    command = [str(Path(sys.executable).parent / 'fastunet'), 'predict', str(run / 'models'), str(run / 'images'), '--out',
               str(tmp_path / 's.csv'), '--workers', '0', '--device', 'cpu']
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 's.csv').read_text() == (RUNS / 'cls' / 'expected.csv').read_text()
    refused = run_fastunet(*command[1:-1], 'cuda:7')            # the refusals in this process: no second import of torch
    assert refused.returncode == 1 and '--device cuda:7' in refused.stderr and 'Traceback' not in refused.stderr, refused.stderr
    assert "--device must be 'cpu', 'cuda' or 'cuda:N'" in run_fastunet(*command[1:-1], 'gpu').stderr


def test_a_run_of_fastunet_0_1_resumes_today(tmp_path):
    "Today's `run_training` defines the run as 0.1.0 did (the run id is a digest of that definition), so its runs resume."
    from fastunet.learner.synthetic import make_synthetic_dataset
    from fastunet.pipeline.records import read_run
    from fastunet.pipeline.workflow import run_training
    data = make_synthetic_dataset(tmp_path / 'train', n_images=24, size=(48, 48), seed=0)      # the fixture's training data
    run_training(data, tmp_path / 'run', arch='unet', encoder_kwargs={'features': 4, 'depth': 2}, n_folds=2, epochs=12, lr=1e-2, bs=4,
                 config='paper', classifier=True)
    then, now = read_run(RUNS / 'bin' / 'models'), read_run(tmp_path / 'run' / 'models')
    assert {k: v for k, v in now['definition'].items() if k != 'data'} == {k: v for k, v in then['definition'].items() if k != 'data'}
    assert now['folds'] == then['folds'] and now['task'] == Task.binary().as_dict() and then.get('task') is None


def test_the_ensemble_refuses_options_that_only_a_submission_uses():
    "A threshold given to the ensemble would change nothing in its probabilities: refused by name, not ignored."
    with pytest.raises(ValueError, match=r"\['threshold', 'wide'\] apply to submissions"):
        FoldEnsemble.from_dir(RUNS / 'bin' / 'models', device='cpu', threshold=0.5, wide=True)
