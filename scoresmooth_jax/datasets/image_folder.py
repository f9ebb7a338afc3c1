"""``folder:PATH`` image sources: the directory layout people keep ImageNet and CIFAR copies in.

``PATH/<split>/<class>/<image>.{png,jpg,jpeg}`` (extensions in any case). Classes are the sub-folders of the
split, sorted by name, and an image's label is its class's index in that order (so ``airplane ... truck`` gives
CIFAR-10's labels 0..9). Images are decoded with Pillow on access (random access, nothing cached), as uint8 RGB,
and returned as float32 [H, W, 3] in [0, 1] like every other ``sources.ImageSource``.

Promises:
  * Every problem that can be seen from the layout fails at construction with an error naming the path: a
    missing split folder (the error lists the splits that exist), a split without class folders, an empty class
    folder.
  * A file that Pillow cannot read, or that is not RGB (grayscale, palette, RGBA, CMYK), fails when it is read,
    with its path and what to do; images are never converted silently, since the certificate is for the exact
    pixels the classifier sees.
  * Without ``image_size``, every image must have the size of the first one (an error names the first that
    does not); with ``image_size``, each image is resized (shorter side, bicubic) and centre-cropped to it.
  * Hidden files and files with other extensions are ignored (e.g. ``.DS_Store``, ``README.txt``).
"""

from __future__ import annotations

import pathlib

import numpy as np

from scoresmooth_jax.datasets.sources import ImageSource, resize_and_crop

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg")


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS)


class FolderSource(ImageSource):
  """Random access to ``PATH/<split>/<class>/*`` images (module docstring)."""

  def __init__(self, root, split: str, image_size: int | None = None):
    root = pathlib.Path(root).expanduser()
    self.name, self.split = f"{PREFIX}{root}", split
    if not root.is_dir():
      raise FileNotFoundError(f"{self.name}: {root} is not a directory; pass folder:PATH with images in "
                              "PATH/<split>/<class>/*.{png,jpg,jpeg}.")
    folder = root / split
    if not folder.is_dir():
      splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
      raise FileNotFoundError(f"{self.name}: no split folder {folder} (splits here: {splits}); put the "
                              f"{split!r} images in {folder}/<class>/.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
      raise ValueError(f"{self.name}: {folder} has no class folders; images go in {folder}/<class>/*.png|jpg.")
    files, labels = [], []
    for label, name in enumerate(classes):
      found = _image_files(folder / name)
      if not found:
        raise ValueError(f"{self.name}: class folder {folder / name} holds no .png/.jpg/.jpeg images; add "
                         "images or remove the folder (labels are the sorted class folders' indices).")
      files += found
      labels += [label] * len(found)
    self.classes, self.num_classes = tuple(classes), len(classes)
    self._files, self._labels = files, np.asarray(labels, np.int32)
    self._image_size = None if image_size is None else int(image_size)
    if self._image_size is None:
      self.image_shape = self._decode(0).shape
    else:
      self.image_shape = (self._image_size, self._image_size, 3)

  def __len__(self):
    return len(self._files)

  def _decode(self, index: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    path = self._files[index]
    try:
      with Image.open(path) as image:
        mode = image.mode
        pixels = np.asarray(image) if mode == "RGB" else None
    except (OSError, UnidentifiedImageError) as err:
      raise ValueError(f"{self.name}: cannot read image {path} ({type(err).__name__}: {err}); replace or "
                       "remove the file.") from err
    if pixels is None:
      raise ValueError(f"{self.name}: {path} is a {mode!r} image, not RGB; convert it (e.g. Pillow's "
                       "image.convert('RGB')) or remove it.")
    return pixels

  def __getitem__(self, index):
    pixels = self._decode(int(index))
    if self._image_size is not None:
      if pixels.shape[:2] != (self._image_size, self._image_size):
        pixels = resize_and_crop(pixels, self._image_size)
    elif pixels.shape != self.image_shape:
      raise ValueError(f"{self.name}: {self._files[int(index)]} is {pixels.shape[1]}x{pixels.shape[0]} but "
                       f"the first image is {self.image_shape[1]}x{self.image_shape[0]}; set image_size to "
                       "resize every image to one size.")
    return pixels.astype(np.float32) / 255.0, int(self._labels[int(index)])
