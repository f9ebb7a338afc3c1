"""Image data for training and certification: one random-access interface over three kinds of source.

``get_source(name, split)`` returns an ``ImageSource``: ``len(src)``, ``src[i] -> (image, label)`` with the
image float32 [H, W, C] in [0, 1] and the label an int, plus ``num_classes``, ``image_shape`` (H, W, C) and
``name``. Names:

* ``"digits"``: the embedded default dataset, which works offline. The 1797 8x8 grayscale handwritten
  digits of the UCI ML hand-written digits data set (Alpaydin & Kaynak, 1998), as bundled by scikit-learn's
  ``sklearn.datasets.load_digits``; pixel values 0..16 are divided by 16. The packaged copy
  ``scoresmooth_jax/data/digits.npz`` was written once from scikit-learn (which the package does not need)
  and also stores the split: a permutation with ``np.random.RandomState(0)``, then the first 40 images of
  each class in that order form the "test" split (400 images, class-balanced), the other 1397 "train".
  "test" is what evaluation and certification use; "all" is every image.
* ``"npz:PATH"``: the user's own arrays, ``images`` (NHWC, or NHW for grayscale; uint8 0..255 or float in
  [0, 1]) and integer ``labels``, read with ``np.load(allow_pickle=False)``. ``PATH`` may contain ``{split}``
  (one file per split); else a boolean ``is_test`` array in the file defines "train"/"test", else the whole
  file is every split. An optional scalar ``num_classes`` overrides max(label) + 1.
* ``"folder:PATH"``: image files in ``PATH/<split>/<class>/*.{png,jpg,jpeg}`` (``image_folder``), labels the
  sorted class folders' indices, decoded with Pillow on access; ``image_size`` resizes as for tfds.
* any tfds image dataset (``"cifar10"``, ``"imagenet2012"``, ...) through ``tfds.data_source``: random
  access without TensorFlow (decoding needs Pillow). ``image_size`` resizes (shorter side to the size, then
  a central crop), which datasets of varying image sizes such as imagenet2012 need.

Training reads ``TrainBatches``: global batches of ``steps_per_dispatch`` x ``batch_size`` images sharded
over the "data" mesh axis, each process reading only its own contiguous slice of the source (the index
slicing ``tfds.split_for_jax_process`` does), in an order that depends only on (seed, step), so a resumed
run sees exactly the batches it would have seen. Random horizontal flips are for natural images only
(never for digits, whose mirror images are not digits). Random crops (``random_crop_padding`` p) zero-pad an
image by p pixels on every side and cut its original size at a uniformly random offset, as torchvision's
``RandomCrop(size, padding=p)`` that Cohen et al. train CIFAR-10 classifiers with. ``eval_batches`` pads the
last batch and masks it. ``load_into_memory`` decodes a folder or tfds split once into uint8 host memory
(config ``data.in_memory``), for accelerators that train faster than one thread decodes files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import pathlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scoresmooth_jax.datasets import image_folder
from scoresmooth_jax.datasets.sources import (DIGITS, FOLDER_PREFIX, NPZ_PREFIX, ArraySource, ImageSource,
                                              TfdsSource, digits, load_npz)
from scoresmooth_jax.runtime import sharding

def get_source(name: str, split: str, *, data_dir=None, image_size: int | None = None) -> ImageSource:
  """The image source called ``name`` (module docstring), split ``split``.

  Args:
    name: "digits", "npz:/path/file.npz", "folder:/path" or a tfds dataset name.
    split: "train", "test", ... (tfds split syntax such as "train[:90%]" works for tfds sources).
    data_dir: tfds data directory (tfds's default when None).
    image_size: resize tfds and folder images to image_size x image_size; for digits and npz it must equal
      the stored size when given.

  Returns:
    An ``ImageSource``.
  """
  if name == DIGITS:
    source = digits(split) if split in ("train", "test", "all") else None
    if source is None:
      raise ValueError(f"split={split!r} is not a split of digits: choose 'train', 'test' or 'all'.")
  elif name.startswith(NPZ_PREFIX):
    path = name[len(NPZ_PREFIX):]
    path = pathlib.Path(path.format(split=split) if "{split}" in path else path).expanduser()
    source = load_npz(name, path, split)
  elif name.startswith(FOLDER_PREFIX):
    return image_folder.FolderSource(name[len(FOLDER_PREFIX):], split, image_size=image_size)
  else:
    return TfdsSource(name, split, data_dir=data_dir, image_size=image_size)
  if image_size is not None and source.image_shape[0] != image_size:
    raise ValueError(f"{name} holds {source.image_shape[0]}x{source.image_shape[1]} images; image_size="
                     f"{image_size} would need resizing, which only tfds sources do: set image_size=None.")
  return source


def load_into_memory(source: ImageSource, *, workers: int | None = None, chunk: int = 512,
                     max_bytes: int = 8 << 30) -> ArraySource:
  """Every image of ``source`` decoded once into host memory (uint8), for fast training on accelerators.

  Decoding image files (Pillow) runs at a few thousand small images per second per core, which starves a GPU
  or TPU that trains a small network on CIFAR-10-sized data; decoded, the 50,000 CIFAR-10 training images
  take 150 MB. Chunks are decoded by ``workers`` threads (default: the host's cores; Pillow releases the
  GIL while decoding). The images are stored as uint8, which is exact: every non-array source here
  decodes 8-bit pixels and divides by 255 (checked chunk by chunk; a source that is not would raise). On
  several hosts each process decodes the whole split (``TrainBatches`` then reads its own slice), which is
  what keeps the row indices, and so the batches, those of decoding on access.

  Raises:
    ValueError: when the decoded split would exceed ``max_bytes`` (ImageNet-sized data: stream it instead),
      or when a chunk is not exactly k / 255 per pixel.
  """
  if isinstance(source, ArraySource):
    return source
  count, shape = len(source), tuple(source.image_shape)
  needed = count * int(np.prod(shape))
  if needed > max_bytes:
    raise ValueError(f"{source.name}: {count} images of {shape} need {needed / 2**30:.1f} GiB decoded, more "
                     f"than max_bytes={max_bytes / 2**30:.1f} GiB; set data.in_memory=False to decode on access "
                     "(or raise max_bytes if the host has the memory).")
  images, labels = np.empty((count, *shape), np.uint8), np.empty((count,), np.int32)

  def decode(start):
    batch, batch_labels = source.get_batch(np.arange(start, min(start + chunk, count)))
    as_uint8 = np.rint(batch * 255.0).astype(np.uint8)
    if not np.array_equal(as_uint8.astype(np.float32) / 255.0, batch):
      raise ValueError(f"{source.name}: images {start}..{start + len(batch) - 1} are not 8-bit pixels / 255, "
                       "so they cannot be kept as uint8; set data.in_memory=False.")
    images[start:start + len(batch)], labels[start:start + len(batch)] = as_uint8, batch_labels

  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    for done, _ in enumerate(pool.map(decode, range(0, count, chunk)), 1):
      if done % 20 == 0 and jax.process_index() == 0:
        logging.info("decoded %d / %d images of %s", min(done * chunk, count), count, source.name)
  return ArraySource(f"{source.name} (in memory)", images, labels, num_classes=source.num_classes)


def process_slice(num: int, process_index: int | None = None, process_count: int | None = None) -> range:
  """This process's contiguous share of ``num`` examples (even split, as ``tfds.split_for_jax_process``)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return range(index * num // count, (index + 1) * num // count)


def _global_array(mesh: Mesh, spec: P, local: np.ndarray, global_shape) -> jax.Array:
  """A global array sharded by ``spec`` from this process's rows (all rows when there is one process)."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, global_shape)


def random_crops(images: np.ndarray, padding: int, offsets: np.ndarray) -> np.ndarray:
  """Zero-pads each image [n, H, W, C] by ``padding`` and cuts H x W at ``offsets`` [n, 2] (row, column).

  Offsets lie in [0, 2 * padding]; (padding, padding) gives the image back unchanged.
  """
  n, height, width = images.shape[:3]
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = offsets[:, 0, None, None] + np.arange(height)[None, :, None]
  cols = offsets[:, 1, None, None] + np.arange(width)[None, None, :]
  return padded[np.arange(n)[:, None, None], rows, cols]


@dataclasses.dataclass
class TrainBatches:
  """Global training batches, [steps_per_dispatch, batch_size, H, W, C], sharded over "data" on axis 1.

  Iterating from ``start_step`` yields ``(images, labels)`` for steps start_step, start_step + k, ...;
  the batch of step t is a function of (seed, t) only. A background thread loads ``prefetch`` dispatches
  ahead, since decoding tfds images is host work that would otherwise stall the devices.
  """

  source: ImageSource
  batch_size: int
  mesh: Mesh
  seed: int
  random_flip: bool = False
  random_crop_padding: int = 0
  steps_per_dispatch: int = 1
  prefetch: int = 2

  def __post_init__(self):
    processes, devices = jax.process_count(), self.mesh.devices.size
    pad = self.random_crop_padding
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
      raise ValueError(f"random_crop_padding={pad!r} must be an int >= 0 (0: no crops; Cohen et al. use 4 on "
                       "CIFAR-10).")
    if self.batch_size % devices or self.batch_size % processes:
      raise ValueError(f"batch_size={self.batch_size} must be divisible by the number of devices ({devices}) "
                       f"and processes ({processes}).")
    self._rows = process_slice(len(self.source))
    self._local_batch = self.batch_size // processes
    if len(self._rows) < self._local_batch:
      raise ValueError(f"{self.source.name} has {len(self._rows)} examples for this process, fewer than one "
                       f"batch ({self._local_batch}); lower batch_size.")

  def _local_step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of step ``step``'s batch: an epoch-wise permutation, drop the remainder."""
    steps_per_epoch = len(self._rows) // self._local_batch
    epoch, position = divmod(step, steps_per_epoch)
    process = jax.process_index()
    order = np.random.default_rng([self.seed, epoch, process]).permutation(len(self._rows))
    picked = order[position * self._local_batch:(position + 1) * self._local_batch]
    images, labels = self.source.get_batch(self._rows.start + picked)
    if self.random_flip:
      flip = np.random.default_rng([self.seed, epoch, process, step, 1]).random(len(picked)) < 0.5
      images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    if self.random_crop_padding:
      pad = self.random_crop_padding
      offsets = np.random.default_rng([self.seed, epoch, process, step, 2]).integers(0, 2 * pad + 1, (len(picked), 2))
      images = random_crops(images, pad, offsets)
    return images, labels

  def _local_dispatch(self, step: int):
    parts = [self._local_step(step + i) for i in range(self.steps_per_dispatch)]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])

  def iterate(self, start_step: int):
    """Yields sharded (images, labels) dispatches from ``start_step`` on, forever."""
    k = self.steps_per_dispatch
    image_shape = (k, self.batch_size, *self.source.image_shape)
    spec = P(None, sharding.DATA_AXIS)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = collections.deque(pool.submit(self._local_dispatch, start_step + i * k)
                                  for i in range(max(1, self.prefetch)))
      step = start_step + len(pending) * k
      try:
        while True:
          images, labels = pending.popleft().result()
          pending.append(pool.submit(self._local_dispatch, step))
          step += k
          yield (_global_array(self.mesh, spec, images, image_shape),
                 _global_array(self.mesh, spec, labels, image_shape[:2]))
      finally:
        for future in pending:
          future.cancel()


def eval_batches(source: ImageSource, batch_size: int, mesh: Mesh, num_examples: int | None = None):
  """Fixed-order batches of the first ``num_examples`` images: (images, labels, mask), sharded on "data".

  The last batch is padded with copies of image 0 and masked (mask 0.0), so metrics must be
  mask-weighted. Every process reads the same indices and contributes its rows of each global batch.
  """
  total = len(source) if num_examples is None else min(int(num_examples), len(source))
  if batch_size % mesh.devices.size:
    raise ValueError(f"eval batch_size={batch_size} must be divisible by the device count "
                     f"{mesh.devices.size}.")
  spec = P(sharding.DATA_AXIS)
  rows = process_slice(batch_size)
  for start in range(0, total, batch_size):
    indices = np.arange(start, start + batch_size)
    mask = (indices < total).astype(np.float32)
    indices = np.where(indices < total, indices, 0)[rows.start:rows.stop]
    images, labels = source.get_batch(indices)
    yield (_global_array(mesh, spec, images, (batch_size, *source.image_shape)),
           _global_array(mesh, spec, labels, (batch_size,)),
           _global_array(mesh, spec, mask[rows.start:rows.stop], (batch_size,)))
