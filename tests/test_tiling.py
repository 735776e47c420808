"""Large images (issue 14): tiles blended back into exactly the image they came from, tiled and whole predictions of the
fold ensemble agreeing, every image reader giving the same windows, memory bounded by a row of tiles, `fastunet predict
--tile` writing the submission of the tiled label maps, and training on tiles read by windows (in DataLoader workers too)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from fastunet.cli import main
from fastunet.learner.image_source import open_image, tile_starts
from fastunet.learner.tiles import tile_dataloaders
from fastunet.learner.unet_learner import more_dynamic_unet_learner
from fastunet.learner.synthetic import make_synthetic_dataset
from fastunet.pipeline.ensemble import FoldEnsemble
from fastunet.pipeline.splits import make_folds
from fastunet.pipeline.submission import rle_decode, rle_encode
from fastunet.pipeline.tiling import predict_labels_tiled, predict_tiled
from fastunet.pipeline.training import train_folds
from fastunet.pipeline.data_folder import segmentation_block
from fastunet.pipeline.prediction import tiled_rows
from fastunet.pipeline.options import PredictOptions
from fastunet.pipeline.thresholds import Thresholds
from fastunet.unet.model import MoreDynamicUnet


def identity(tiles: torch.Tensor) -> torch.Tensor: return tiles.float() / 255


@pytest.mark.parametrize('shape, tile, overlap, blend', [
    ((101, 7000), 1024, 0.25, 'gaussian'),          # a strip, far wider than a tile and lower than one
    ((333, 517), 64, 0.5, 'gaussian'), ((333, 517), 100, 17, 'constant'), ((50, 60), 16, 0, 'constant')])
def test_blended_tiles_give_back_the_image_they_came_from(shape, tile, overlap, blend):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    probabilities = predict_tiled(identity, image, tile=tile, overlap=overlap, blend=blend, tile_batch=3, n_channels=1)
    assert probabilities.shape == (1, *shape)
    torch.testing.assert_close(probabilities[0], torch.from_numpy(image / 255).float(), rtol=0, atol=1e-6)


@pytest.fixture(scope='module')
def fold_run(tmp_path_factory):
    "One fold of resnet10t trained on 64² salt-like images, and a larger image of the same kind as TIFF, tiled TIFF, .npy and PNG."
    # its own data, seeded: the session's shared data sets take their seeds from the order tests ask for them
    data = make_synthetic_dataset(tmp_path_factory.mktemp('tiling_data'), n_images=64, size=(64, 64), seed=0)
    df = make_folds([str(p) for p in sorted((data / 'images').glob('*.png'))], n_folds=2, seed=0)
    out = tmp_path_factory.mktemp('tiling_fold')
    torch.manual_seed(0)
    train_folds(segmentation_block(1), df, 'resnet10t', out, epochs=6, bs=8, lr=1e-2, folds=[0], seed=0,
                dls_kwargs=dict(num_workers=0), learner_kwargs=dict(pretrained=False))
    large = make_synthetic_dataset(tmp_path_factory.mktemp('large'), n_images=1, size=(230, 310), empty_fraction=0, seed=4)
    image = np.array(Image.open(large / 'images' / '0000.png'))
    folder = tmp_path_factory.mktemp('formats')
    tifffile.imwrite(folder / 'plain.tif', image)
    tifffile.imwrite(folder / 'tiled.tif', image, tile=(64, 64), compression='zlib')
    np.save(folder / 'array.npy', image)
    Image.fromarray(image).save(folder / 'image.png')
    return FoldEnsemble.from_dir(out, device='cpu', folds=[0]), image, folder, out


def test_an_image_that_fits_a_tile_is_predicted_whole(fold_run):
    ensemble, image, *_ = fold_run
    whole = ensemble.predict([image], progress=False)[0]
    torch.testing.assert_close(predict_tiled(ensemble, image, tile=512), whole, rtol=0, atol=1e-6)


def test_tiled_prediction_with_overlap_matches_the_whole_image(fold_run):
    ensemble, image, *_ = fold_run
    whole = ensemble.predict([image], progress=False)[0][1]
    tiled = predict_tiled(ensemble, image, tile=128, overlap=0.5)[1]
    assert 0.05 < (whole > 0.5).float().mean() < 0.95                      # a real mask, not all background
    # a small model trained for seconds on 64² images, whose receptive field is larger than the tiles: 99.05% measured here
    # (nbs/36_pipeline.tiling.ipynb asserts ≥ 99.9% for a model trained on 101² images, tiles of 128 on a 600 × 900 image)
    assert ((tiled > 0.5) == (whole > 0.5)).float().mean() >= 0.98
    assert (tiled - whole).abs().mean() < 0.02
    naive = predict_tiled(ensemble, image, tile=96, overlap=0, blend='constant', reflect=False)[1]
    assert (tiled - whole).abs().mean() < (naive - whole).abs().mean()      # blending is what makes it match


def test_every_reader_gives_the_same_tiled_prediction(fold_run):
    ensemble, image, folder, _ = fold_run
    expected = predict_tiled(ensemble, image, tile=96, overlap=0.25)
    for name, reader in [('plain.tif', 'ArraySource'), ('tiled.tif', 'TiffSegmentSource'), ('array.npy', 'ArraySource'),
                         ('image.png', 'ArraySource')]:
        assert type(open_image(folder / name, 1)).__name__ == reader
        torch.testing.assert_close(predict_tiled(ensemble, folder / name, tile=96, overlap=0.25), expected, rtol=0, atol=0)


def test_label_maps_hold_no_float_probabilities_of_the_whole_image(tmp_path):
    "Peak memory (numpy's allocations, as tracemalloc sees them) for a 12000 × 1500 image stays far below its float32 probabilities."
    image = np.lib.format.open_memmap(tmp_path / 'large.npy', 'w+', np.uint8, (12000, 1500))
    image[:] = np.random.default_rng(0).integers(0, 256, (12000, 1500), dtype=np.uint8)
    image.flush(); del image
    tracemalloc.start()
    labels = predict_labels_tiled(identity, tmp_path / 'large.npy', threshold=0.5, path=tmp_path / 'labels.npy',
                                  tile=256, overlap=0.25, n_channels=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 12000 * 1500 * 4 / 4, f'{peak / 2 ** 20:.0f} MiB'          # a quarter of the float map (69 MiB); a band is 1.6 MiB
    source = np.load(tmp_path / 'large.npy', mmap_mode='r')
    assert np.array_equal(labels, source > 127)


def test_rle_of_a_memory_mapped_label_map_is_read_by_columns(tmp_path):
    labels = np.lib.format.open_memmap(tmp_path / 'labels.npy', 'w+', np.uint8, (9000, 3000))   # two blocks of columns
    mask = np.random.default_rng(1).random((9000, 3000)) > 0.999
    mask[:, 1860:1870] = True                                                  # runs across the blocks' boundary (column 1864)
    labels[:] = mask
    assert np.array_equal(rle_decode(rle_encode(labels), labels.shape), mask)


def test_fastunet_predict_with_tiles_writes_the_tiled_label_maps(fold_run, tmp_path, monkeypatch):
    ensemble, image, folder, run = fold_run
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('plain.tif', 'tiled.tif', 'array.npy'): (images / name.replace('.', '_x.')).write_bytes((folder / name).read_bytes())
    out = tmp_path / 'submission.csv'
    monkeypatch.setattr('sys.argv', ['fastunet', 'predict', str(run), str(images), '--out', str(out), '--folds', '0',
                                     '--tile', '96', '--overlap', '24'])
    main()
    rows = pd.read_csv(out, keep_default_na=False)
    expected = predict_labels_tiled(ensemble, image, tile=96, overlap=24) == 1    # two classes: a row per image and class 1
    assert sorted(rows['id']) == ['array_x_1', 'plain_x_1', 'tiled_x_1'] and 0 < expected.mean() < 1
    for rle in rows['rle_mask']: assert np.array_equal(rle_decode(rle, image.shape), expected)


def test_a_tiff_that_cannot_be_opened_is_named_and_no_submission_is_left(fold_run, tmp_path, monkeypatch):
    *_, run = fold_run
    images = tmp_path / 'images'
    images.mkdir()
    (images / 'broken.tif').write_bytes(b'II*\x00 not really a tiff')
    out = tmp_path / 'submission.csv'
    monkeypatch.setattr('sys.argv', ['fastunet', 'predict', str(run), str(images), '--out', str(out), '--folds', '0', '--tile', '96'])
    with pytest.raises(SystemExit, match="broken.tif' cannot be read as a TIFF"): main()
    assert list(tmp_path.glob('*submission*')) == []


@pytest.fixture(scope='module')
def large_pair(tmp_path_factory):
    "Two generated 300×400 grayscale images with masks; the first also as a zlib-tiled TIFF."
    data = make_synthetic_dataset(tmp_path_factory.mktemp('large_pair'), n_images=2, size=(300, 400), empty_fraction=0, seed=5)
    images, masks = sorted((data / 'images').glob('*.png')), sorted((data / 'masks').glob('*.png'))
    tiff = data / 'train.tif'
    tifffile.imwrite(tiff, np.array(Image.open(images[0])), tile=(64, 64), compression='zlib')
    return images, masks, tiff


def test_tiles_read_by_dataloader_workers_are_the_tiles_read_in_process(large_pair):
    images, masks, tiff = large_pair
    batches = []
    for workers in (0, 2):
        dls = tile_dataloaders([tiff], [masks[0]], [tiff], [masks[0]], tile=64, samples=16, bs=4, num_workers=workers,
                               batch_tfms=[])
        batches.append([(x.clone(), y.clone()) for x, y in dls.valid])             # the fixed tiling: the same in any process
    assert len(batches[0]) == len(batches[1]) == -(-len(tile_starts(300, 64, 64)) * len(tile_starts(400, 64, 64)) // 4)
    for (x0, y0), (x1, y1) in zip(*batches): assert torch.equal(x0, x1) and torch.equal(y0, y1)
    image, mask = np.array(Image.open(images[0])), np.array(Image.open(masks[0]))
    x, y = batches[1][0]
    assert torch.equal(x[0, 0], torch.from_numpy(image[:64, :64] / 255).float()) and torch.equal(y[0], torch.from_numpy(mask[:64, :64]).long())


def test_a_learner_trained_on_tiles_predicts_a_large_image_by_tiles(large_pair):
    images, masks, tiff = large_pair
    torch.manual_seed(0)
    dls = tile_dataloaders([tiff], [masks[0]], [images[1]], [masks[1]], tile=64, samples=32, foreground_bias=0.5, bs=8, num_workers=0)
    learn = more_dynamic_unet_learner(dls, 'resnet10t', pretrained=False)
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()
    probabilities = predict_tiled(learn, images[1], tile=128, overlap=0.25)
    assert probabilities.shape == (2, 300, 400)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(300, 400), rtol=0, atol=1e-4)


def test_binary_tiled_rows_use_the_threshold_and_empty_masks_below_min_area(tmp_path):
    "A one-output (sigmoid) ensemble: the tiled rows are the RLE of probabilities > threshold, emptied below min_area."
    torch.manual_seed(0)
    model = MoreDynamicUnet('resnet10t', n_out=1, n_in=1, pretrained=False)
    ensemble = FoldEnsemble([model], dict(n_in=1, n_out=1, activation='sigmoid', normalize=None), device='cpu')
    tiling = PredictOptions(tile=64, overlap=0.25, tile_batch=4, blend='gaussian', tta=True)
    image = np.random.default_rng(2).integers(0, 256, (150, 230), dtype=np.uint8)
    tifffile.imwrite(tmp_path / 'gray_strips.tif', image, rowsperstrip=7, compression='zlib')   # strips of 7 rows
    probabilities = predict_tiled(ensemble, tmp_path / 'gray_strips.tif', tile=64, overlap=0.25, tile_batch=4)[0]
    threshold = float(probabilities.median())                        # about half the pixels foreground: a real mask
    [(name, rle)] = tiled_rows(ensemble, [tmp_path / 'gray_strips.tif'], Thresholds((threshold,), (0,)), tiling)
    assert name == 'gray_strips' and np.array_equal(rle_decode(rle, image.shape), (probabilities > threshold).numpy())
    [(_, emptied)] = tiled_rows(ensemble, [tmp_path / 'gray_strips.tif'], Thresholds((threshold,), (image.size,)), tiling)
    assert emptied == ''


def test_rgb_tiffs_in_strips_and_tiles_give_the_windows_of_the_image(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / 'strips.tif', image, rowsperstrip=16, compression='zlib')
    tifffile.imwrite(tmp_path / 'tiles.tif', image, tile=(32, 16), compression='zlib')
    for name in ('strips.tif', 'tiles.tif'):
        probabilities = predict_tiled(identity, tmp_path / name, tile=48, overlap=0.5, n_channels=3)
        torch.testing.assert_close(probabilities, torch.from_numpy(image / 255).float().permute(2, 0, 1), rtol=0, atol=1e-6)


def test_a_terminated_tiled_prediction_leaves_no_file_behind(fold_run, tmp_path):
    "SIGTERM (a scheduler's time limit) ends `fastunet predict --tile` like Ctrl-C: no submission, no temporary file."
    import signal, subprocess, time
    from conftest import fastunet_command
    *_, run = fold_run
    images = tmp_path / 'images'
    images.mkdir()
    np.save(images / 'large.npy', np.random.default_rng(0).integers(0, 256, (1500, 1500), dtype=np.uint8))
    out = tmp_path / 'out' / 'submission.csv'
    process = subprocess.Popen([fastunet_command(), 'predict', str(run), str(images), '--out', str(out), '--folds', '0',
                                '--tile', '32', '--overlap', '16'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.parent.glob('.submission.csv.*.tmp')) and time.time() < deadline and process.poll() is None: time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]       # still predicting its 8,000 tiles
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []


def test_fastunet_predict_with_d4_tta_by_tiles(fold_run, tmp_path, monkeypatch):
    ensemble, image, folder, run = fold_run
    images = tmp_path / 'images'
    images.mkdir()
    (images / 'one.tif').write_bytes((folder / 'tiled.tif').read_bytes())
    out = tmp_path / 'submission.csv'
    monkeypatch.setattr('sys.argv', ['fastunet', 'predict', str(run), str(images), '--out', str(out), '--folds', '0',
                                     '--tile', '96', '--tta', 'd4'])
    main()
    [rle] = pd.read_csv(out, keep_default_na=False)['rle_mask']
    expected = predict_labels_tiled(ensemble, image, tile=96, tta='d4') == 1
    assert np.array_equal(rle_decode(rle, image.shape), expected)
    assert not np.array_equal(expected, predict_labels_tiled(ensemble, image, tile=96) == 1)    # d4 is not the flip alone
