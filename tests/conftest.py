"Shared fixtures: small generated data sets (made once per session, never changed) and fresh DataLoaders over them."
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use('Agg')
os.environ.setdefault('HF_HUB_OFFLINE', '1')   # nothing is downloaded here; fail fast instead of retrying

from fastai.vision.all import SegmentationDataLoaders, get_image_files, set_seed  # noqa: E402

from fastunet.learner.data import MaskFromFolder, image_class  # noqa: E402
from fastunet.learner.synthetic import make_synthetic_dataset  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):      # `pytest -n 3`: processes of one thread each (small tensors gain
    import torch                               # little from a second thread, and processes with two threads each contend)
    torch.set_num_threads(1)

ISBI = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'isbi2012'
collect_ignore = ['benchmarks']   # benchmarks are run by hand, never collected as tests


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end runs (demo, ISBI, several processes), trainings of several epochs, exports and '
                            'compilation; skip with -m "not slow" for a quick run (CI runs everything)')


def console_script(name: str) -> str:
    "A console script installed beside this Python (`fastunet`, `torchrun`); skip the test where it is missing."
    command = Path(sys.executable).parent / name
    if not command.exists(): pytest.skip(f'the {name} console script is not installed (pip install -e .)')
    return str(command)


def fastunet_command() -> str: return console_script('fastunet')


def run_fastunet(*args: str) -> subprocess.CompletedProcess:
    """`fastunet ARGS` in this process (no second interpreter importing torch and fastai: seconds a call): its exit status
    and what it wrote to stderr, as `subprocess.run` gives them. Tests of the console script itself run it as a process."""
    from fastunet.cli import main
    err, old = io.StringIO(), sys.argv
    sys.argv = ['fastunet', *args]
    try:
        with contextlib.redirect_stderr(err): main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str): err.write(e.code + '\n')
    finally: sys.argv = old
    return subprocess.CompletedProcess(['fastunet', *args], code, '', err.getvalue())


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    "`fastunet ARGV` in this process: (exit status, what it printed to stderr); what it printed is taken from `capsys`."
    result = run_fastunet(*argv)
    return result.returncode, result.stderr + capsys.readouterr().err


def make_dls(path: Path, n_channels: int = 1, n_classes: int = 2, bs: int = 4, label_func=None, **kwargs):
    "SegmentationDataLoaders over a folder written by `make_synthetic_dataset`."
    set_seed(0)
    return SegmentationDataLoaders.from_label_func(
        path, get_image_files(path / 'images'), label_func or MaskFromFolder(), codes=[f'c{i}' for i in range(n_classes)],
        img_cls=image_class(n_channels), bs=bs, num_workers=0, seed=0, **kwargs)


@pytest.fixture(scope='session')
def data_factory(tmp_path_factory):
    "Make (and cache) a synthetic data set: data_factory(n_channels, n_classes, size, n_images). Tests only read it."
    cache = {}
    def make(n_channels: int = 1, n_classes: int = 2, size=(101, 101), n_images: int = 12):
        key = (n_channels, n_classes, tuple(size), n_images)
        if key not in cache:
            dest = tmp_path_factory.mktemp(f'synthetic_{n_channels}ch_{n_classes}cls')
            cache[key] = make_synthetic_dataset(dest, n_images=n_images, size=tuple(size), n_classes=n_classes,
                                                n_channels=n_channels, seed=len(cache))
        return cache[key]
    return make


@pytest.fixture
def gray_dls(data_factory):
    "Fresh DataLoaders for every test: a learner adds its `Normalize` to them, as fastai's `unet_learner` does."
    return make_dls(data_factory(1, 2))
