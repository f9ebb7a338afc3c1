"""Data sources (digits, npz, tfds under mock_data) and sharded, resumable training batches."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from scoresmooth_jax.datasets import data
from scoresmooth_jax.runtime import sharding


def test_digits_splits():
  train, test, everything = (data.get_source("digits", s) for s in ("train", "test", "all"))
  assert (len(train), len(test), len(everything)) == (1397, 400, 1797)
  for source in (train, test):
    assert source.image_shape == (8, 8, 1) and source.num_classes == 10 and source.name == "digits"
  image, label = test[0]
  assert image.dtype == np.float32 and image.shape == (8, 8, 1) and isinstance(label, int)
  images, labels = everything.get_batch(np.arange(len(everything)))
  assert images.min() == 0.0 and images.max() == 1.0
  # pixel values are k / 16 (scikit-learn's 0..16 scaled)
  np.testing.assert_array_equal(images * 16, np.round(images * 16))
  assert np.bincount(test.get_batch(np.arange(400))[1]).tolist() == [40] * 10
  # the two splits are disjoint: no test image also appears in train
  train_rows = {row.tobytes() for row in train.get_batch(np.arange(len(train)))[0]}
  test_rows = [row.tobytes() for row in test.get_batch(np.arange(400))[0]]
  assert sum(row in train_rows for row in test_rows) <= 2  # (a couple of digits are pixel-identical)
  with pytest.raises(ValueError, match="split='validation'"):
    data.get_source("digits", "validation")


def test_npz_source(tmp_path):
  rng = np.random.default_rng(0)
  uint8 = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "u8.npz", images=uint8, labels=np.arange(6) % 3)
  source = data.get_source(f"npz:{tmp_path / 'u8.npz'}", "test")
  assert len(source) == 6 and source.image_shape == (4, 4, 3) and source.num_classes == 3
  np.testing.assert_allclose(source[2][0], uint8[2] / 255.0, rtol=1e-6)
  assert source[2][1] == 2

  gray = rng.uniform(size=(5, 4, 4)).astype(np.float64)  # grayscale without a channel axis, floats in [0, 1]
  np.savez(tmp_path / "gray_train.npz", images=gray, labels=np.zeros(5, np.int64), num_classes=np.int64(7))
  np.savez(tmp_path / "gray_test.npz", images=gray[:2], labels=np.zeros(2, np.int64), num_classes=np.int64(7))
  per_split = f"npz:{tmp_path / 'gray_{split}.npz'}"
  train, test = data.get_source(per_split, "train"), data.get_source(per_split, "test")
  assert (len(train), len(test), train.image_shape, train.num_classes) == (5, 2, (4, 4, 1), 7)
  np.testing.assert_allclose(test.get_batch([1])[0][0, ..., 0], gray[1], rtol=1e-6)

  np.savez(tmp_path / "mask.npz", images=uint8, labels=np.arange(6) % 3, is_test=np.arange(6) >= 4)
  assert len(data.get_source(f"npz:{tmp_path / 'mask.npz'}", "train")) == 4
  assert len(data.get_source(f"npz:{tmp_path / 'mask.npz'}", "test")) == 2


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.full((2, 4, 4, 1), 255.0), labels=np.zeros(2, int)), r"outside \[0, 1\]"),
    (dict(images=np.full((2, 4, 4, 1), np.nan), labels=np.zeros(2, int)), "NaN"),
    (dict(images=np.zeros((2, 4, 4, 1)), labels=np.zeros(3, int)), "labels have shape"),
    (dict(pictures=np.zeros((2, 4, 4, 1)), labels=np.zeros(2, int)), "lacks array"),
])
def test_npz_source_rejects_bad_files(tmp_path, arrays, message):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=message):
    data.get_source(f"npz:{tmp_path / 'bad.npz'}", "test")


def test_missing_npz_and_unknown_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="no file"):
    data.get_source(f"npz:{tmp_path / 'nothing.npz'}", "test")
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
    data.get_source("no_such_dataset_xyz", "train")


def test_tfds_source_under_mock_data():
  with tfds.testing.mock_data(num_examples=12):
    source = data.get_source("cifar10", "train")
    assert (len(source), source.image_shape, source.num_classes) == (12, (32, 32, 3), 10)
    image, label = source[3]
    assert image.dtype == np.float32 and image.shape == (32, 32, 3) and 0 <= label < 10
    assert 0.0 <= image.min() and image.max() <= 1.0
    resized = data.get_source("cifar10", "train", image_size=16)
    assert resized.image_shape == (16, 16, 3) and resized[3][0].shape == (16, 16, 3)


def test_train_batches_are_sharded_deterministic_and_resumable():
  mesh = sharding.data_mesh()
  assert mesh.devices.size == 8
  source = data.get_source("digits", "train")
  batches = data.TrainBatches(source, 16, mesh, seed=3, steps_per_dispatch=2)
  it = batches.iterate(0)
  dispatches = [next(it) for _ in range(3)]
  images, labels = dispatches[0]
  assert images.shape == (2, 16, 8, 8, 1) and labels.shape == (2, 16)
  assert images.sharding.spec == jax.sharding.PartitionSpec(None, "data")
  assert len(images.addressable_shards) == 8 and images.addressable_shards[0].data.shape == (2, 2, 8, 8, 1)
  # starting at step 4 gives exactly the third dispatch (steps 4, 5): the order is a function of (seed, step)
  resumed_images, resumed_labels = next(batches.iterate(4))
  np.testing.assert_array_equal(resumed_images, dispatches[2][0])
  np.testing.assert_array_equal(resumed_labels, dispatches[2][1])
  # within an epoch no image repeats
  seen = np.concatenate([np.asarray(d[0]).reshape(-1, 64) for d in dispatches])
  assert len({row.tobytes() for row in seen}) >= 95
  with pytest.raises(ValueError, match="divisible"):
    data.TrainBatches(source, 12, mesh, seed=0)


def test_random_flip_only_when_asked():
  mesh = sharding.data_mesh()
  source = data.get_source("digits", "train")
  plain = np.asarray(next(data.TrainBatches(source, 64, mesh, seed=0).iterate(0))[0])[0]
  flipped = np.asarray(next(data.TrainBatches(source, 64, mesh, seed=0, random_flip=True).iterate(0))[0])[0]
  same = np.all(plain == flipped, axis=(1, 2, 3))
  mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
  assert np.all(same | mirrored) and 10 < mirrored.sum() < 54


def test_random_crops_are_zero_padded_shifts():
  images = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1) + 1
  # (padding, padding) is the identity; (0, 0) moves the image down and right, zeros entering top and left.
  same = data.random_crops(images, 2, np.array([[2, 2], [2, 2]]))
  np.testing.assert_array_equal(same, images)
  moved = data.random_crops(images, 2, np.array([[0, 0], [4, 3]]))
  expected0 = np.zeros_like(images[0])
  expected0[2:, 2:] = images[0, :1, :2]
  expected1 = np.zeros_like(images[1])
  expected1[:1, :3] = images[1, 2:, 1:]  # the other extreme: up and left
  np.testing.assert_array_equal(moved, np.stack([expected0, expected1]))


def test_random_crops_in_training_batches():
  mesh = sharding.data_mesh()
  source = data.get_source("digits", "train")
  plain = np.asarray(next(data.TrainBatches(source, 64, mesh, seed=0).iterate(0))[0])[0]
  crops = lambda: data.TrainBatches(source, 64, mesh, seed=0, random_crop_padding=2)
  cropped = np.asarray(next(crops().iterate(0))[0])[0]
  np.testing.assert_array_equal(cropped, np.asarray(next(crops().iterate(0))[0])[0])  # a function of (seed, step)
  # Each cropped image is its plain image shifted by some (dy, dx) in [-2, 2]^2, with zeros moved in.
  shifts = []
  for x, y in zip(plain, cropped):
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(data.random_crops(x[None], 2, np.array([[2 - dy, 2 - dx]]))[0], y)]
    assert matches, "a cropped image is not a zero-padded shift of its original"
    shifts.append(matches[0])
  assert len(set(shifts)) > 10  # the offsets vary over the batch
  with pytest.raises(ValueError, match="random_crop_padding=-1 must be an int >= 0"):
    data.TrainBatches(source, 64, mesh, seed=0, random_crop_padding=-1)


def test_process_slices_partition_the_data():
  parts = [data.process_slice(10, i, 3) for i in range(3)]
  assert [list(p) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_eval_batches_pad_and_mask():
  mesh = sharding.data_mesh()
  source = data.get_source("digits", "test")
  batches = list(data.eval_batches(source, 64, mesh, num_examples=100))
  assert len(batches) == 2
  assert float(sum(np.asarray(mask).sum() for _, _, mask in batches)) == 100
  np.testing.assert_array_equal(np.asarray(batches[1][1])[:36], source.get_batch(np.arange(64, 100))[1])
