"""``folder:PATH`` sources: layout, labels, exact pixels, resizing, and the errors a user can act on."""

import numpy as np
import pytest
from PIL import Image

from scoresmooth_jax.datasets import data, sources
from scoresmooth_jax.runtime import sharding


def _write(path, pixels, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, format=fmt)


def _tree(root, rng, classes=("cat", "airplane", "dog"), per_class=(2, 3, 1), size=6):
  """Writes lossless PNGs; returns {(class, file name): pixels}."""
  written = {}
  for name, count in zip(classes, per_class):
    for i in range(count):
      pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      _write(root / "train" / name / f"{i:03d}.png", pixels)
      written[(name, f"{i:03d}.png")] = pixels
  return written


def test_labels_are_sorted_class_indices_and_pixels_exact(tmp_path):
  written = _tree(tmp_path, np.random.default_rng(0))
  (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
  (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
  source = data.get_source(f"folder:{tmp_path}", "train")
  assert source.classes == ("airplane", "cat", "dog") and source.num_classes == 3
  assert len(source) == 6 and source.image_shape == (6, 6, 3)
  images, labels = source.get_batch(np.arange(len(source)))
  assert images.dtype == np.float32 and labels.tolist() == [0, 0, 0, 1, 1, 2]
  expected = [written[("airplane", f"{i:03d}.png")] for i in range(3)] + \
             [written[("cat", f"{i:03d}.png")] for i in range(2)] + [written[("dog", "000.png")]]
  np.testing.assert_array_equal(np.round(images * 255).astype(np.uint8), np.stack(expected))


def test_jpeg_any_case_extension_and_training_batches(tmp_path):
  for label, name in enumerate(("a", "b")):
    for i in range(4):
      _write(tmp_path / "train" / name / f"{i}.JPG", np.full((8, 8, 3), 40 * label + 10 * i, np.uint8), "JPEG")
  source = data.get_source(f"folder:{tmp_path}", "train")
  assert len(source) == 8 and source[5][1] == 1
  np.testing.assert_allclose(source[5][0], 50 / 255, atol=2 / 255)  # flat JPEGs decode almost exactly
  mesh = sharding.data_mesh()
  batches = data.TrainBatches(source, 8, mesh, seed=0, random_flip=True)
  images, labels = next(batches.iterate(0))
  assert images.shape == (1, 8, 8, 8, 3) and sorted(np.asarray(labels).ravel().tolist()) == [0] * 4 + [1] * 4


def test_image_size_resizes_and_crops(tmp_path):
  rng = np.random.default_rng(2)
  _write(tmp_path / "val" / "x" / "wide.png", rng.integers(0, 256, (10, 20, 3), dtype=np.uint8))
  _write(tmp_path / "val" / "x" / "tall.png", rng.integers(0, 256, (30, 12, 3), dtype=np.uint8))
  source = data.get_source(f"folder:{tmp_path}", "val", image_size=8)
  assert source.image_shape == (8, 8, 3)
  assert all(source[i][0].shape == (8, 8, 3) for i in range(2))
  unsized = data.get_source(f"folder:{tmp_path}", "val")  # files sort as tall.png, wide.png
  assert unsized.image_shape == (30, 12, 3)
  with pytest.raises(ValueError, match="wide.png is 20x10 but the first image is 12x30; set image_size"):
    unsized[1]


def test_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    data.get_source(f"folder:{tmp_path / 'missing'}", "train")
  _tree(tmp_path, np.random.default_rng(3))
  with pytest.raises(FileNotFoundError, match=r"no split folder .*test \(splits here: \['train'\]\)"):
    data.get_source(f"folder:{tmp_path}", "test")
  (tmp_path / "train" / "empty").mkdir()
  with pytest.raises(ValueError, match=r"class folder .*empty holds no \.png"):
    data.get_source(f"folder:{tmp_path}", "train")
  (tmp_path / "nothing").mkdir()
  with pytest.raises(ValueError, match="has no class folders"):
    data.get_source(f"folder:{tmp_path}", "nothing")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_refused(tmp_path, mode):
  _write(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
  Image.new(mode, (4, 4)).save(tmp_path / "train" / "a" / "1.png")
  source = data.get_source(f"folder:{tmp_path}", "train")
  assert source[0][0].shape == (4, 4, 3)
  with pytest.raises(ValueError, match=rf"1\.png is a '{mode}' image, not RGB; convert it"):
    source[1]


def test_unreadable_file_is_named(tmp_path):
  _write(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
  (tmp_path / "train" / "a" / "1.jpg").write_bytes(b"not a jpeg at all")
  source = data.get_source(f"folder:{tmp_path}", "train")
  with pytest.raises(ValueError, match=r"cannot read image .*1\.jpg"):
    source[1]


def test_load_into_memory_equals_decoding_on_access(tmp_path):
  _tree(tmp_path, np.random.default_rng(3), per_class=(5, 4, 7))
  lazy = data.get_source(f"folder:{tmp_path}", "train")
  kept = data.load_into_memory(lazy, workers=2, chunk=3)  # several chunks, the last one short
  assert isinstance(kept, sources.ArraySource) and kept.num_classes == 3 and len(kept) == 16
  order = np.random.default_rng(0).permutation(16)
  for got, want in zip(kept.get_batch(order), lazy.get_batch(order)):
    np.testing.assert_array_equal(got, want)
  mesh = sharding.data_mesh()
  batches = [data.TrainBatches(s, 8, mesh, seed=1, random_flip=True).iterate(0) for s in (lazy, kept)]
  for _ in range(5):  # the same training batches, step for step
    (a, la), (b, lb) = next(batches[0]), next(batches[1])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
  assert data.load_into_memory(kept) is kept  # already in memory


def test_load_into_memory_refuses_too_much_and_non_8bit(tmp_path):
  _tree(tmp_path, np.random.default_rng(4))
  lazy = data.get_source(f"folder:{tmp_path}", "train")
  with pytest.raises(ValueError, match=r"need .* GiB decoded.*data.in_memory=False"):
    data.load_into_memory(lazy, max_bytes=6 * 6 * 3 * 5)  # 6 images, room for 5

  class HalfSteps(sources.ImageSource):  # pixels that are not k / 255
    name, num_classes, image_shape = "half", 2, (2, 2, 1)

    def __len__(self):
      return 4

    def __getitem__(self, index):
      return np.full(self.image_shape, 0.5 / 255, np.float32), index % 2

  with pytest.raises(ValueError, match=r"half: images 0..3 are not 8-bit"):
    data.load_into_memory(HalfSteps())
