"""The repository's promises: the package is what nbdev-export makes of the notebooks, the README is what the index
notebook makes, CI runs the README's test command, the layers import only downwards, importing changes nothing in
fastai or torch, and the public names of `fastunet.all` stay."""
from __future__ import annotations

import ast
import filecmp
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install -c .ci/constraints.txt -e ".[dev]" && nbdev-test && pytest -n 3 --dist worksteal'

# every name `fastunet.all` exported before the package was laid out by layer: users' code imports them
PUBLIC_NAMES = [
    'ACTIVATIONS', 'AttentionGate', 'BCELovaszLoss', 'BinaryDice', 'BinaryIoU', 'CELovaszLoss', 'ConvNormAct',
    'DecoderBlock', 'DecoderStage', 'Encoder', 'FoldEnsemble', 'HEAD_NAMES', 'IMAGENET_STATS', 'IMAGE_MODES',
    'KeepBestEpoch', 'LovaszHingeLoss', 'LovaszSoftmaxLoss', 'MUST_AGREE', 'MaskFromFolder', 'MiddleBlock',
    'MoreDynamicUnet', 'MultiDice', 'MultiIoU', 'NORMS', 'PILImageRGBA', 'PRETRAINEDMODELS_UNSUPPORTED',
    'PlainTensorInput', 'PretrainedWeightsUnavailable', 'ResBlock', 'SCSE', 'SelfAttention', 'SymmetricLovaszLoss',
    'TGSMetric', 'TGS_THRESHOLDS', 'TimmEncoder', 'TracedEncoder', 'UPSAMPLE_MODES', 'UnetConfig', 'Upsample',
    'act_layer', 'adapt_first_conv', 'adapt_stats', 'apply_threshold', 'arch_name', 'atomic_write', 'barrier',
    'broadcast_state', 'check_segmentation_batch', 'coverage_bins', 'create_encoder', 'crop_pads', 'cv_table',
    'data_parallel', 'find_size_divisor', 'fold_paths', 'foreground_mask', 'hflip_tta', 'is_main_process',
    'load_fold_records', 'load_into_model', 'load_local_state_dict', 'lovasz_grad', 'lovasz_hinge', 'lovasz_softmax',
    'make_folds', 'make_synthetic_dataset', 'mask_coverage', 'more_dynamic_unet_learner', 'norm_layer', 'out_of_fold',
    'pad_to_multiple', 'pad_valid_convolutions', 'plan_decoder', 'pretrainedmodels_encoder', 'pretrainedmodels_names',
    'resize_to', 'resolve_arch', 'rle_decode', 'rle_encode', 'search_threshold', 'symmetric_lovasz', 'tgs_scores',
    'torchvision_encoder', 'train_folds', 'unet_splitter', 'unwrap_model', 'write_submission']

# the layers, lowest first: a module may import its own layer and those below it, never above
LAYERS = ['encoders', 'unet', 'learner', 'pipeline', 'cli']


def git_files() -> list[str]:
    if not (ROOT / '.git').exists() or shutil.which('git') is None: pytest.skip('not a git checkout')
    return subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def package_modules(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / 'fastunet').rglob('*.py'))


def test_nbdev_export_on_a_clean_checkout_changes_nothing(tmp_path):
    for name in git_files():
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    exporter = Path(sys.executable).parent / 'nbdev-export'
    subprocess.run([str(exporter)], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    generated, committed = package_modules(tmp_path), package_modules(ROOT)
    assert generated == committed
    changed = [name for name in generated if not filecmp.cmp(tmp_path / name, ROOT / name, shallow=False)]
    assert changed == [], f'edit the notebooks, run nbdev-export and commit both: {changed}'


def test_every_module_has_its_notebook_named_after_it():
    "nbs/NN_encoders.contract.ipynb makes fastunet/encoders/contract.py: the numbers follow the layers."
    notebooks = {p.stem.split('_', 1)[1]: p.stem for p in (ROOT / 'nbs').glob('[0-9]*.ipynb')}
    modules = {m.removeprefix('fastunet/').removesuffix('.py').replace('/', '.') for m in package_modules(ROOT)
               if not m.endswith(('__init__.py', '_modidx.py'))}
    assert modules == set(notebooks)
    # fastai's numbering: '26a' sits between 26 and 27 (a module added later between two others)
    numbers = {name: int(re.match(r'\d+', stem)[0]) for name, stem in notebooks.items() if name != 'all'}
    by_layer = [sorted(n for name, n in numbers.items() if name.split('.')[0] == layer) for layer in LAYERS]
    assert all(max(lower) < min(higher) for lower, higher in zip(by_layer, by_layer[1:])), by_layer


def imported_layers(path: Path) -> set[str]:
    "The fastunet layers a module imports (relative imports resolved)."
    package = path.relative_to(ROOT).with_suffix('').parts[:-1]        # ('fastunet', 'unet')
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level: target = list(package[:len(package) - node.level + 1]) + (node.module or '').split('.')
            else: target = (node.module or '').split('.')
            if target[0] == 'fastunet' and len(target) > 1: layers.add(target[1])
        elif isinstance(node, ast.Import):
            layers |= {a.name.split('.')[1] for a in node.names if a.name.startswith('fastunet.')}
    return layers & set(LAYERS)


def test_layers_import_only_downwards():
    for module in (ROOT / 'fastunet').rglob('*.py'):
        parts = module.relative_to(ROOT / 'fastunet').with_suffix('').parts
        layer = parts[0] if parts[0] in LAYERS else None
        if layer is None: continue                                         # all.py, _modidx.py, __init__.py
        allowed = set(LAYERS[:LAYERS.index(layer) + 1])
        assert imported_layers(module) <= allowed, f'{module.relative_to(ROOT)} imports {imported_layers(module) - allowed}'


def test_importing_fastunet_changes_nothing_in_fastai_or_torch():
    code = '''
import fastai.vision.all as fv, fastai.distributed as fd, torch
def snapshot(): return ({k: id(v) for k, v in vars(fv.Learner).items()}, fd.DistributedDL._broadcast, dict(vars(torch.nn.Module)))
before = snapshot()
import fastunet.all
print(snapshot() == before)
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == 'True', out.stderr[-2000:]


def test_public_names_are_kept():
    import fastunet.all
    assert set(PUBLIC_NAMES) <= set(fastunet.all.__all__)
    assert all(getattr(fastunet.all, name, None) is not None for name in fastunet.all.__all__)


def test_readme_is_made_from_the_index_notebook():
    result = subprocess.run([sys.executable, 'tools/make_readme.py', '--check'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_readme_opens_with_code_that_runs():
    "The first code block of the README is the index notebook's first code cell, which nbdev-test runs."
    readme = (ROOT / 'README.md').read_text()
    first_block = readme.split('```python\n', 1)[1].split('```', 1)[0]
    assert 'make_synthetic_dataset' in first_block and 'fit_one_cycle' in first_block
    assert readme.index('```python') < readme.index('## Install and run')


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / 'README.md').read_text(), (ROOT / '.ci' / 'run').read_text()
    assert TEST_COMMAND in readme and TEST_COMMAND in ci
    assert 'fastunet demo' in readme
    pins = (ROOT / '.ci' / 'constraints.txt').read_text()
    assert 'torch==2.14.1' in pins and 'torchvision==0.29.1' in pins


def test_no_run_output_is_committed():
    assert not [name for name in git_files() if name.startswith(('fastunet_demo/', 'fastunet_run/'))]


def package_sources() -> list[Path]:
    return [p for p in (ROOT / 'fastunet').rglob('*.py') if p.name != '_modidx.py']


def test_no_private_name_crosses_a_module_border():
    "A name with a leading underscore is its module's own: neither another module nor a test imports it."
    crossings = []
    for path in package_sources() + sorted((ROOT / 'tests').rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or '').startswith('fastunet')):
                crossings += [f'{path.relative_to(ROOT)}:{node.lineno} {alias.name}' for alias in node.names
                              if alias.name.startswith('_') and not alias.name.startswith('__')]
    assert crossings == []


def test_modules_stay_small_and_calls_pass_few_positional_arguments():
    "No module much over 250 lines; no call of fastunet's own functions with more than five positional arguments."
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in package_sources()}
    assert {name: n for name, n in sizes.items() if n > 280} == {}
    trees = {p: ast.parse(p.read_text()) for p in package_sources()}
    defined = {n.name for tree in trees.values() for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    long_calls = [f'{p.relative_to(ROOT)}:{n.lineno} {ast.unparse(n.func)}' for p, tree in trees.items() for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and len(n.args) > 5 and ast.unparse(n.func).split('.')[-1] in defined]
    assert long_calls == []
