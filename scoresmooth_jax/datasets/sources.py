"""Image sources: random access to (image, label) pairs, for ``data.get_source`` and ``image_folder``.

``ImageSource`` is the interface (``len``, ``src[i] -> (float32 [H, W, C] in [0, 1], int label)``,
``get_batch``, ``num_classes``, ``image_shape``, ``name``); ``ArraySource`` holds arrays in memory (the embedded
digits, ``npz:`` files, decoded folders); ``TfdsSource`` reads a tfds dataset without TensorFlow. The formats
and names are described in ``data``'s docstring.
"""

from __future__ import annotations

import abc
import functools
import importlib.resources
import logging
import pathlib

import numpy as np

DIGITS = "digits"
NPZ_PREFIX = "npz:"
FOLDER_PREFIX = "folder:"


class ImageSource(abc.ABC):
  """Random access to (image float32 [H, W, C] in [0, 1], int label) pairs."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @abc.abstractmethod
  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...

  def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 [n, H, W, C] and labels int32 [n] for ``indices``."""
    items = [self[int(i)] for i in indices]
    images = np.stack([image for image, _ in items]) if items else np.zeros((0, *self.image_shape), np.float32)
    return images, np.asarray([label for _, label in items], np.int32)

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r}, {len(self)} images of {self.image_shape}, " \
           f"{self.num_classes} classes)"


class ArraySource(ImageSource):
  """An in-memory source (digits, npz files); uint8 images are kept as uint8 and scaled on access."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, num_classes: int | None = None):
    images = np.asarray(images)
    if images.ndim == 3:  # grayscale without a channel axis
      images = images[..., None]
    if images.ndim != 4:
      raise ValueError(f"{name}: images have shape {images.shape}; expected NHWC (or NHW for grayscale).")
    if images.dtype != np.uint8:
      if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name}: images have dtype {images.dtype}; store uint8 (0..255) or floats in [0, 1].")
      images = images.astype(np.float32)
      if not np.isfinite(images).all():
        raise ValueError(f"{name}: images contain NaN or infinite values; clean the data before saving.")
      lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
      if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: float images span [{lo}, {hi}], outside [0, 1]; divide by 255 (or store "
                         "uint8) before saving.")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name}: labels have shape {labels.shape} and dtype {labels.dtype}; expected "
                       f"{images.shape[0]} integer labels, one per image.")
    if labels.size and labels.min() < 0:
      raise ValueError(f"{name}: negative label {labels.min()}; labels must be 0..num_classes-1.")
    inferred = int(labels.max()) + 1 if labels.size else 0
    num_classes = inferred if num_classes is None else int(num_classes)
    if inferred > num_classes:
      raise ValueError(f"{name}: label {inferred - 1} does not fit num_classes={num_classes}.")
    self.name, self.num_classes = name, num_classes
    self.image_shape = tuple(int(d) for d in images.shape[1:])
    self._images, self._labels = images, labels.astype(np.int32)

  def __len__(self):
    return self._images.shape[0]

  def _scale(self, images):
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images

  def __getitem__(self, index):
    return self._scale(self._images[index]), int(self._labels[index])

  def get_batch(self, indices):
    indices = np.asarray(indices, np.int64)
    return self._scale(self._images[indices]), self._labels[indices]


def _select_split(name: str, arrays, split: str) -> np.ndarray | slice:
  """Which rows of an npz file form ``split``: by its ``is_test`` mask, or every row."""
  if "is_test" in arrays:
    is_test = np.asarray(arrays["is_test"], bool)
    choices = {"train": ~is_test, "test": is_test, "all": np.ones_like(is_test)}
    if split not in choices:
      raise ValueError(f"split={split!r} is not a split of {name}: choose one of {sorted(choices)}.")
    return choices[split]
  logging.info("%s has no is_test mask: split %r is the whole file.", name, split)
  return slice(None)


def load_npz(name: str, path: pathlib.Path, split: str) -> ArraySource:
  if not path.is_file():
    raise FileNotFoundError(f"{name}: no file {path}; pass npz:/path/to/file.npz with arrays `images` and "
                            "`labels`.")
  with np.load(path, allow_pickle=False) as arrays:
    missing = {"images", "labels"} - set(arrays.files)
    if missing:
      raise ValueError(f"{name}: {path} lacks array(s) {sorted(missing)} (has {arrays.files}); save images "
                       "as `images` (NHWC) and labels as `labels`.")
    rows = _select_split(name, arrays, split)
    num_classes = int(arrays["num_classes"]) if "num_classes" in arrays.files else None
    return ArraySource(name, arrays["images"][rows], arrays["labels"][rows], num_classes)


def digits_path() -> pathlib.Path:
  """The packaged copy of the embedded digits dataset."""
  return pathlib.Path(str(importlib.resources.files("scoresmooth_jax") / "data" / "digits.npz"))


class TfdsSource(ImageSource):
  """A tfds dataset through ``tfds.data_source`` (array_record files, no TensorFlow at run time)."""

  def __init__(self, name: str, split: str, data_dir=None, image_size: int | None = None):
    import tensorflow_datasets as tfds  # heavy import, only for tfds sources

    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # tfds raises DatasetNotFoundError and friends; the user needs the name.
      raise ValueError(f"unknown dataset {name!r}: not 'digits', 'npz:/path.npz' or 'folder:/path', and tfds "
                       f"cannot build it ({type(err).__name__}: {err}).") from err
    features = builder.info.features
    if "image" not in features or "label" not in features:
      raise ValueError(f"tfds dataset {name!r} has features {sorted(features)}; an image source needs "
                       "'image' and 'label'.")
    self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    native = tuple(features["image"].shape)
    channels = native[-1]
    if image_size is None:
      if None in native:
        raise ValueError(f"tfds dataset {name!r} has images of varying size {native}; set image_size "
                         "(e.g. 224 for imagenet2012) to resize them.")
      self.image_shape = tuple(int(d) for d in native)
    else:
      self.image_shape = (int(image_size), int(image_size), int(channels))
    self.name, self.num_classes, self.split = name, int(features["label"].num_classes), split

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    example = self._source[int(index)]
    image = np.asarray(example["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape != self.image_shape:
      image = resize_and_crop(image, self.image_shape[0])
    return image.astype(np.float32) / 255.0, int(example["label"])


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to ``size`` (bicubic), then the central size x size crop: uint8 [size, size, C]."""
  from PIL import Image  # tfds already needs Pillow to decode images without TensorFlow

  height, width = image.shape[:2]
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image).resize((new_w, new_h), Image.BICUBIC)
  out = np.asarray(pil)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  out = out[top:top + size, left:left + size]
  return out[..., None] if squeeze else out


@functools.lru_cache(maxsize=8)
def digits(split: str) -> ArraySource:
  return load_npz(DIGITS, digits_path(), split)
