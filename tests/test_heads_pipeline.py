"""Deep supervision, the empty-mask classifier and EMA through every layer a user reaches them by: `fastunet train`
(its records, the threshold search), the fold ensemble and `fastunet predict`. Submissions are checked against the
ensemble's own gated predictions, so a wrong row cannot pass."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_fastunet
from fastunet.learner.data import MaskFromFolder, image_array
from fastunet.learner.metrics import tgs_scores
from fastunet.learner.synthetic import make_synthetic_dataset
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.records import fold_paths, fold_problem, load_fold_records, out_of_fold, out_of_fold_nonempty, read_run
from fastunet.pipeline.submission import DEFAULT_CLASSIFIER_THRESHOLDS, apply_threshold, rle_decode, search_threshold
from fastunet.pipeline.data_folder import list_images
from fastunet.pipeline.prediction import run_prediction
from fastunet.pipeline.workflow import run_training
from fastunet.unet.model import MoreDynamicUnet

TRAIN = dict(arch='resnet10t', n_folds=2, epochs=2, lr=1e-3, bs=4, seed=0)


def cli(*args: str) -> subprocess.CompletedProcess:
    result = run_fastunet(*args)         # in this process: a second interpreter's imports cost seconds a call
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope='module')
def salt(tmp_path_factory) -> Path:
    "Salt-like data with many empty masks, where the classifier has something to do."
    return make_synthetic_dataset(tmp_path_factory.mktemp('salt'), n_images=16, size=(64, 64), seed=1, empty_fraction=0.4)


@pytest.fixture(scope='module')
def heads_run(salt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('heads_run')
    cli('train', str(salt), '--out', str(out), '--arch', 'resnet10t', '--folds', '2', '--epochs', '2', '--bs', '4',
        '--seed', '0', '--deep-supervision', '--classifier', '--ema', '0.9')
    return out


def uint8_batch(paths: list[Path]) -> torch.Tensor:
    "Images as the ensemble reads them: a uint8 batch (N, 1, H, W)."
    return torch.stack([torch.from_numpy(np.array(image_array(p, 1))).permute(2, 0, 1) for p in paths])


def test_train_records_the_heads_the_ema_and_the_classifier_threshold(heads_run, salt):
    models = heads_run / 'models'
    records = load_fold_records(models)
    for record in records:
        assert record['config']['deep_supervision'] and record['config']['classifier'] and record['ema'] == 0.9
        assert len(record['oof_nonempty']) == len(record['valid_index'])
        assert all(0 < p < 1 for p in record['oof_nonempty'])
    definition = read_run(models)['definition']
    assert definition['learner']['deep_supervision'] is True and definition['learner']['ema'] == 0.9
    # the three thresholds were chosen together on the out-of-fold predictions, in the order of folds.csv
    df = pd.read_csv(heads_run / 'folds.csv')
    oof = torch.from_numpy(out_of_fold(models, len(df)).astype(np.float32))[:, 0]
    nonempty = out_of_fold_nonempty(models, len(df))
    assert not np.isnan(nonempty).any()
    truths = torch.from_numpy(np.stack([MaskFromFolder().array(salt / p) for p in df['item']]))
    expected = search_threshold(oof, truths, tgs_scores, min_areas=(0, 10, 25, 50), nonempty=torch.from_numpy(nonempty))
    chosen = json.loads((models / 'threshold.json').read_text())
    assert (chosen['threshold'], chosen['min_area'], chosen['classifier_threshold']) == expected[:3]
    assert chosen['classifier_threshold'] in DEFAULT_CLASSIFIER_THRESHOLDS
    report = json.loads((heads_run / 'report.json').read_text())
    assert report['oof_tgs'] == pytest.approx(expected[3]) and report['classifier_threshold'] == expected[2]


def test_the_saved_classifier_gives_the_recorded_out_of_fold_probabilities(heads_run, salt):
    models = heads_run / 'models'
    record = load_fold_records(models, folds=[0])[0]
    ensemble = FoldEnsemble.from_dir(models, folds=[0], device='cpu')
    df = pd.read_csv(heads_run / 'folds.csv')
    held_out = [salt / df['item'][i] for i in record['valid_index']]
    batch = uint8_batch(held_out)
    np.testing.assert_allclose(ensemble.nonempty_probabilities(batch).numpy(), record['oof_nonempty'], atol=1e-4)


@pytest.mark.slow
def test_predict_empties_the_images_the_classifier_calls_empty(heads_run, salt, tmp_path):
    models, images = heads_run / 'models', list_images(salt / 'images')
    chosen = json.loads((models / 'threshold.json').read_text())
    ungated = FoldEnsemble.from_dir(models, device='cpu', classifier_threshold=0.)
    probs = ungated.predict(images, bs=4, progress=False)[:, 0]
    nonempty = ungated.nonempty_probabilities(uint8_batch(images))
    for flag, classifier_threshold in ((None, chosen['classifier_threshold']), ('0', 0.), ('0.5', 0.5), ('1', 1.)):
        csv = tmp_path / f'submission_{flag}.csv'
        cli('predict', str(models), str(salt / 'images'), '--out', str(csv), *(['--classifier-threshold', flag] if flag else []))
        rows = pd.read_csv(csv, keep_default_na=False)
        expected = apply_threshold(probs, chosen['threshold'], chosen['min_area'], nonempty, classifier_threshold)
        for rle, mask in zip(rows['rle_mask'], expected): np.testing.assert_array_equal(rle_decode(rle, (64, 64)), mask.numpy())
        if flag == '1': assert (rows['rle_mask'] == '').all()             # no image reaches probability 1
    # threshold 0 is no gating at all: the plain ensemble's masks
    assert apply_threshold(probs, chosen['threshold'], chosen['min_area'], nonempty, 0.).equal(
        apply_threshold(probs, chosen['threshold'], chosen['min_area']))


def test_ensemble_gates_its_probabilities_and_checks_the_threshold(heads_run):
    models = heads_run / 'models'
    x = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ungated = FoldEnsemble.from_dir(models, device='cpu', classifier_threshold=0.)
    nonempty = ungated.nonempty_probabilities(x)
    cut = float(nonempty.median())                       # one image below, one at and one above
    gated = FoldEnsemble.from_dir(models, device='cpu', classifier_threshold=cut).predict_batch(x)
    plain = ungated.predict_batch(x)
    for image in range(3):
        expected = plain[image] if nonempty[image] >= cut else torch.zeros_like(plain[image])
        torch.testing.assert_close(gated[image], expected)
    with pytest.raises(ValueError, match=r'classifier.threshold must be a probability'):
        FoldEnsemble.from_dir(models, device='cpu', classifier_threshold=1.5)
    # by default, the threshold fastunet train chose; tiles are never gated (the classifier judged whole images)
    chosen = json.loads((models / 'threshold.json').read_text())['classifier_threshold']
    assert FoldEnsemble.from_dir(models, device='cpu').classifier_threshold == chosen
    from fastunet.pipeline.tiling import tile_predictor
    torch.testing.assert_close(tile_predictor(FoldEnsemble.from_dir(models, device='cpu', classifier_threshold=cut))(x), plain)
    plain_model = FoldEnsemble([MoreDynamicUnet('resnet10t', n_in=1)], dict(activation='sigmoid', n_in=1, n_out=1), device='cpu')
    assert plain_model.classifier_threshold is None
    with pytest.raises(ValueError, match='no empty-mask classifier'): plain_model.nonempty_probabilities(x)


def test_rerun_resumes_and_a_run_without_the_heads_is_another_run(heads_run, salt, tmp_path):
    models = heads_run / 'models'
    mtimes = [fold_paths(models, k)['weights'].stat().st_mtime_ns for k in (0, 1)]
    run_training(salt, heads_run, **TRAIN, deep_supervision=True, classifier=True, ema=0.9)
    assert [fold_paths(models, k)['weights'].stat().st_mtime_ns for k in (0, 1)] == mtimes      # nothing trained again
    with pytest.raises(ValueError, match=r"learner\.classifier True then, '\(not set\)' now"):
        run_training(salt, heads_run, **TRAIN, deep_supervision=True, ema=0.9)
    with pytest.raises(ValueError, match=r"learner\.ema 0\.9 then, 0\.99 now"):
        run_training(salt, heads_run, **TRAIN, deep_supervision=True, classifier=True, ema=0.99)
    with pytest.raises(ValueError, match='--ema must be a decay strictly between 0 and 1'):
        run_training(salt, tmp_path / 'bad', **TRAIN, ema=1.0)


def test_a_fold_without_the_classifier_probabilities_is_trained_again(heads_run, salt, tmp_path):
    out = tmp_path / 'copy'
    shutil.copytree(heads_run, out)
    models = out / 'models'
    record_path = fold_paths(models, 1)['record']
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({k: v for k, v in record.items() if k != 'oof_nonempty'}))
    with pytest.raises(ValueError, match="fold 1's record .* lacks the classifier's out-of-fold probabilities"):
        out_of_fold_nonempty(models, 16)
    assert 'classifier' in fold_problem(models, 1, read_run(models), record['valid_index'])
    weights_0 = fold_paths(models, 0)['weights'].stat().st_mtime_ns
    run_training(salt, out, **TRAIN, deep_supervision=True, classifier=True, ema=0.9)
    assert fold_paths(models, 0)['weights'].stat().st_mtime_ns == weights_0
    assert len(json.loads(record_path.read_text())['oof_nonempty']) == len(record['valid_index'])


def test_classifier_threshold_is_refused_for_folds_without_a_classifier(salt, tmp_path):
    run_training(salt, tmp_path, **dict(TRAIN, epochs=1))
    assert 'classifier_threshold' not in json.loads((tmp_path / 'models' / 'threshold.json').read_text())
    images = list_images(salt / 'images')
    with pytest.raises(ValueError, match='--classifier-threshold applies to folds trained with an empty-mask classifier'):
        run_prediction(tmp_path / 'models', images, tmp_path / 'submission.csv', classifier_threshold=0.5)
    assert not (tmp_path / 'submission.csv').exists()
    run_prediction(tmp_path / 'models', images, tmp_path / 'submission.csv', classifier_threshold=0.)   # 0: nothing to gate


@pytest.mark.parametrize('arch, options', [('resnet10t', {}), ('convnext_atto', dict(hypercolumns=True, config='blog'))])
def test_eval_and_export_graph_with_heads_is_the_plain_one(arch, options):
    torch.manual_seed(0)
    plain = MoreDynamicUnet(arch, n_out=2, **options).eval()
    heads = MoreDynamicUnet(arch, n_out=2, deep_supervision=True, classifier=True, **options).eval()
    missing, unexpected = heads.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and {k.split('.')[0] for k in missing} == {'auxiliary', 'classifier'}
    x = torch.randn(1, 3, 72, 88)
    programs = [torch.export.export(model, (x,)) for model in (plain, heads)]
    operations = [[str(n.target) for n in p.graph.nodes if n.op == 'call_function'] for p in programs]
    assert operations[0] == operations[1]
    torch.testing.assert_close(programs[0].module()(x), programs[1].module()(x), rtol=0, atol=0)
    assert isinstance(heads.train()(x), dict)


def test_tiles_are_not_gated_and_an_explicit_threshold_with_tiles_is_refused(heads_run, salt, tmp_path):
    with pytest.raises(ValueError, match='--classifier-threshold with --tile'):
        run_prediction(heads_run / 'models', list_images(salt / 'images'), tmp_path / 's.csv', tile=32, classifier_threshold=0.5)
    assert not (tmp_path / 's.csv').exists()


def test_runs_recorded_before_the_heads_keep_their_definition_and_weights_load_across_them(tmp_path):
    "A run made with a UnetConfig before these options existed still resumes; init_dir loads plain weights into a model with heads."
    from fastunet.pipeline.training import definition_value, load_init_weights
    from fastunet.unet.config import UnetConfig
    assert 'deep_supervision' not in definition_value(UnetConfig()) and 'classifier' not in definition_value(UnetConfig(hypercolumns=True))
    assert definition_value(UnetConfig(classifier=True))['classifier'] is True
    plain = MoreDynamicUnet('resnet10t', n_in=1)
    torch.save(plain.state_dict(), tmp_path / 'fold_0.pth')
    heads = MoreDynamicUnet('resnet10t', n_in=1, deep_supervision=True, classifier=True)
    load_init_weights(heads, tmp_path / 'fold_0.pth')
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(heads.eval()(x), plain.eval()(x))
    with pytest.raises(ValueError, match='do not fit this model'): load_init_weights(MoreDynamicUnet('resnet18', n_in=1), tmp_path / 'fold_0.pth')
