"""The repository's promises: the package is what nbdev-export makes of the notebooks, the README is what
the index notebook makes, CI runs the README's test command, and the `fastunet` command does real work."""
from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastunet.submission import rle_decode

from conftest import ISBI, fastunet_command

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install -c .ci/constraints.txt -e ".[dev]" && nbdev-test && pytest'


def git_files() -> list[str]:
    if not (ROOT / '.git').exists() or shutil.which('git') is None: pytest.skip('not a git checkout')
    return subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_nbdev_export_on_a_clean_checkout_changes_nothing(tmp_path):
    for name in git_files():
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    exporter = Path(sys.executable).parent / 'nbdev-export'
    subprocess.run([str(exporter)], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    generated = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / 'fastunet').glob('*.py'))
    committed = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / 'fastunet').glob('*.py'))
    assert generated == committed
    changed = [name for name in generated if not filecmp.cmp(tmp_path / name, ROOT / name, shallow=False)]
    assert changed == [], f'edit the notebooks, run nbdev-export and commit both: {changed}'


def test_readme_is_made_from_the_index_notebook():
    result = subprocess.run([sys.executable, 'tools/make_readme.py', '--check'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / 'README.md').read_text(), (ROOT / '.ci' / 'run').read_text()
    assert TEST_COMMAND in readme and TEST_COMMAND in ci
    assert 'fastunet demo' in readme
    pins = (ROOT / '.ci' / 'constraints.txt').read_text()
    assert 'torch==2.14.1' in pins and 'torchvision==0.29.1' in pins


def test_cli_help():
    out = subprocess.run([fastunet_command(), '--help'], capture_output=True, text=True).stdout
    assert 'demo' in out and 'train' in out and 'predict' in out
    out = subprocess.run([fastunet_command(), 'demo', '--help'], capture_output=True, text=True).stdout
    assert '--epochs' in out and '--arch' in out and '--folds' in out
    out = subprocess.run([fastunet_command(), 'train', '--help'], capture_output=True, text=True).stdout
    assert '--binary-masks' in out and '--fold' in out
    result = subprocess.run([fastunet_command(), 'nonsense'], capture_output=True, text=True)
    assert result.returncode == 2


def test_demo_runs_the_whole_pipeline(tmp_path):
    result = subprocess.run([fastunet_command(), 'demo', '--dest', str(tmp_path), '--n-images', '24', '--n-test', '7',
                             '--folds', '2', '--epochs', '1', '--size', '64', '--bs', '4'], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r'test TGS metric: \d\.\d+ without TTA, \d\.\d+ with flip TTA', result.stdout), result.stdout[-2000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    assert len(report['cv']) == 2 and 0 <= report['oof_tgs'] <= 1 and 0 <= report['test_tgs_with_tta'] <= 1
    rows = (tmp_path / 'submission.csv').read_text().splitlines()
    assert rows[0] == 'id,rle_mask' and len(rows) == 8
    for row in rows[1:]:
        assert rle_decode(row.split(',')[1], (64, 64)).shape == (64, 64)
    assert (tmp_path / 'predictions.png').read_bytes()[:4] == b'\x89PNG'
    assert sorted(p.name for p in (tmp_path / 'models').glob('fold_*.json')) == ['fold_0.json', 'fold_1.json']
    assert not list(tmp_path.rglob('*.tmp')), 'temporary files left behind'


@pytest.mark.skipif(not ISBI.exists(), reason=f'ISBI 2012 data not found at {ISBI}')
def test_train_and_predict_on_isbi(tmp_path):
    result = subprocess.run([fastunet_command(), 'train', str(ISBI), '--out', str(tmp_path), '--arch', 'resnet10t', '--folds', '2',
                             '--epochs', '1', '--crop', '128', '--bs', '4', '--mask-folder', 'labels', '--binary-masks'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads((tmp_path / 'report.json').read_text())['cv']) == 2
    out, test_images = tmp_path / 'submission.csv', tmp_path / 'test_images'
    test_images.mkdir()
    for image in sorted((ISBI / 'images').glob('*.png'))[:4]: (test_images / image.name).symlink_to(image)   # a few keep it fast
    result = subprocess.run([fastunet_command(), 'predict', str(tmp_path / 'models'), str(test_images), '--out', str(out),
                             '--threshold', '0.5'], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = out.read_text().splitlines()[1:]
    assert [row.split(',')[0] for row in rows] == ['00', '01', '02', '03']
    assert rle_decode(rows[0].split(',')[1], (512, 512)).shape == (512, 512)
