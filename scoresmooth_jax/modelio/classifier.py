"""The base classifier of randomized smoothing: a Flax model plus its input normalisation, as one JAX callable.

``Classifier`` is what ``smoothing.sample_counts`` / ``certify`` take as ``base_classifier``:

    clf = load_classifier("exports/resnet20")          # or Classifier(...) built in memory
    logits = clf(x)                                    # x: [B, H, W, C] in [0, 1] -> float32 [B, num_classes]

Promises:
  * ``clf(x)`` is pure and jittable. Normalisation ((x - mean) / std) happens inside, i.e. after the noise that
    smoothing adds in [0, 1] pixel space, so it is part of the base classifier and keeps the guarantee.
  * BatchNorm runs in inference mode (running statistics): the function is deterministic, per example.
  * ``compute_dtype`` (e.g. bfloat16) is the precision of the network; normalisation is done in float32 and
    logits are returned in float32. Certify in the precision you deploy: the certificate is for that function.
  * A ``Classifier`` is hashable by identity (``eq=False``), which is what ``smoothing``'s compile cache keys on:
    pass the same object for every image.
  * An input of the wrong shape fails at trace time with a message naming the expected (H, W, C).
  * ``clf.folded()`` (or ``load_classifier(..., fold_batchnorm=True)``) is the same classifier with every BatchNorm
    folded into the convolution before it (``models.resnet.fold_batchnorm``): logits equal the unfolded ones up to
    float rounding (~1e-6 relative in float32) and a bias add replaces BatchNorm's scale and shift after every
    convolution. The folded function is the one a certificate is then about; fold before certifying, not in
    between. On CPU the folded network runs its convolutions on XLA:CPU's oneDNN kernel with the bias, residual
    add and ReLU fused (``models.onednn_conv``: bfloat16 stays bfloat16 there) where ``onednn_conv.available``
    says it can, which computes the same function by another summation order; elsewhere on XLA's convolutions.
  * ``export_classifier`` / ``load_classifier`` are the one on-disk format (``modelio.checkpoint`` export
    with ``"kind": "classifier"``) that training code and the PyTorch converter both write; loading restores the
    arrays bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax import models
from scoresmooth_jax.modelio import checkpoint
from scoresmooth_jax.models import onednn_conv
from scoresmooth_jax.models import resnet
from scoresmooth_jax.runtime import sharding

KIND = "classifier"

# Keys that export_classifier writes itself; extra_metadata may add others but not override these.
_RESERVED_KEYS = ("kind", "model", "model_kwargs", "mean", "std", "num_classes", "image_shape")

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _canonical_dtype(compute_dtype) -> Any:
  """None (float32) or a floating dtype given as a dtype or its name; anything else fails with the choices."""
  if compute_dtype is None:
    return None
  if isinstance(compute_dtype, str):
    if compute_dtype not in _COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={compute_dtype!r}: choose one of {sorted(_COMPUTE_DTYPES)} or None.")
    return _COMPUTE_DTYPES[compute_dtype]
  try:
    dtype = jnp.dtype(compute_dtype)
  except TypeError:
    raise ValueError(f"compute_dtype={compute_dtype!r} is not a dtype: pass e.g. jnp.bfloat16 or 'bfloat16'.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"compute_dtype={compute_dtype!r} is not a floating dtype: pass e.g. jnp.bfloat16.")
  return dtype.type


def _per_channel(name: str, values, channels: int) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
  except (TypeError, ValueError):
    raise ValueError(f"{name}={values!r} must be a sequence of {channels} numbers, one per channel.") from None
  if len(out) != channels:
    raise ValueError(f"{name}={values!r} has {len(out)} values but the images have {channels} channels; give "
                     f"one value per channel.")
  if not all(math.isfinite(v) for v in out):
    raise ValueError(f"{name}={values!r} must be finite.")
  return out


def _normalisation(mean, std, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  mean = _per_channel("mean", mean, channels)
  std = _per_channel("std", std, channels)
  if min(std) <= 0:
    raise ValueError(f"std={std!r} must be positive: images are divided by it.")
  return mean, std


def _num_classes(num_classes) -> int:
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes!r} must be a positive integer.")
  return int(num_classes)


def _image_shape(image_shape) -> tuple[int, int, int]:
  shape = tuple(image_shape)
  if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
    raise ValueError(f"image_shape={image_shape!r} must be (H, W, C) with positive integers, e.g. (32, 32, 3).")
  return tuple(int(d) for d in shape)


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
  """A Flax classifier with its input normalisation: ``clf(x in [0, 1]) -> float32 logits``.

  Attributes:
    module: the Flax Linen module (already built with its compute dtype), applied with ``train=False``.
    variables: its variables, ``{"params": ..., "batch_stats": ...}``.
    mean: per-channel mean subtracted from images in [0, 1].
    std: per-channel standard deviation that the centred images are divided by (all > 0).
    num_classes: number of logits.
    image_shape: (H, W, C) the classifier accepts.
    compute_dtype: the network's compute dtype; None keeps the module's own ``dtype`` (float32 by default),
      a dtype rebuilds the module with it (``module.clone(dtype=...)``).
    metadata: everything else that came with the export (source, accuracy, ...).
  """

  module: Any
  variables: Any
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int
  image_shape: tuple[int, int, int]
  compute_dtype: Any = None
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    shape = _image_shape(self.image_shape)
    mean, std = _normalisation(self.mean, self.std, shape[-1])
    object.__setattr__(self, "image_shape", shape)
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "std", std)
    object.__setattr__(self, "num_classes", _num_classes(self.num_classes))
    compute_dtype = _canonical_dtype(self.compute_dtype)
    object.__setattr__(self, "compute_dtype", compute_dtype)
    if compute_dtype is not None and getattr(self.module, "dtype", compute_dtype) != compute_dtype:
      module = self.module.clone(dtype=compute_dtype)
      # A network folded for oneDNN in float32 keeps the same parameters on XLA's convolutions where oneDNN cannot
      # run the new dtype (bfloat16 without AVX512-BF16), instead of failing at its first call.
      if getattr(module, "conv_impl", "xla") == "onednn" and not onednn_conv.available(compute_dtype):
        module = module.clone(conv_impl="xla")
      object.__setattr__(self, "module", module)

  def apply(self, variables, x: jax.Array) -> jax.Array:
    """The classifier as a pure function of its variables: x [B, H, W, C] in [0, 1] -> float32 logits."""
    if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(f"the classifier expects a batch of images [B, H, W, C] with (H, W, C) = "
                       f"{self.image_shape} in [0, 1]; got an array of shape {tuple(x.shape)}. Resize or "
                       "crop the images, or add a batch axis (x[None]) for a single image.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"the classifier expects floating images in [0, 1]; got dtype {x.dtype} (for uint8 "
                       "images pass x / 255).")
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    normalised = (x.astype(jnp.float32) - mean) / std
    logits = self.module.apply(variables, normalised, train=False)
    if logits.shape != (x.shape[0], self.num_classes):
      raise ValueError(f"the model returned logits of shape {logits.shape}, not ({x.shape[0]}, "
                       f"{self.num_classes}): num_classes={self.num_classes} does not match the model.")
    return logits.astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] in [0, 1] -> float32 logits [B, num_classes]; jittable."""
    return self.apply(self.variables, x)

  @property
  def batchnorm_folded(self) -> bool:
    """Whether the network runs with BatchNorm folded into its convolutions (``folded()``)."""
    return bool(getattr(self.module, "fold_bn", False))

  @property
  def foldable(self) -> bool:
    """Whether ``folded()`` applies: the network is one of our ResNets, whose BatchNorms follow convolutions."""
    return isinstance(self.module, (resnet.CifarResNet, resnet.ResNet))

  def folded(self, backend: str | None = None, conv_impl: str | None = None) -> "Classifier":
    """This classifier with BatchNorm folded into the convolutions: the same logits, cheaper to evaluate.

    A new ``Classifier`` (a new identity, so ``smoothing`` compiles it once on its own) whose module is built
    with ``fold_bn=True`` and whose variables are ``{"params": ...}`` with scaled kernels and added biases. Keeps
    the compute dtype and metadata. A classifier that is already folded is returned as it is.

    Args:
      backend: the JAX backend the classifier will run on (default: ``jax.default_backend()``).
      conv_impl: "xla" or "onednn" (``resnet.CONV_IMPLS``); by default "onednn" where
        ``onednn_conv.available(compute dtype, backend)``, else "xla".
    """
    if self.batchnorm_folded:
      return self
    if not self.foldable:
      raise ValueError(f"folding BatchNorm needs a ResNet from scoresmooth_jax.models.resnet (CifarResNet or "
                       f"ResNet); this classifier's module is {type(self.module).__name__}. Use it unfolded.")
    if conv_impl is None:
      conv_impl = "onednn" if onednn_conv.available(self.module.dtype, backend) else "xla"
    elif conv_impl not in resnet.CONV_IMPLS:
      raise ValueError(f"folded(conv_impl={conv_impl!r}): choose one of {resnet.CONV_IMPLS}, or None to choose "
                       "by backend.")
    module = self.module.clone(fold_bn=True, conv_impl=conv_impl)
    return dataclasses.replace(self, module=module,
                               variables=jax.tree.map(jnp.asarray, resnet.fold_batchnorm(self.variables)),
                               metadata={**self.metadata, "batchnorm_folded": True})


def _json_ready(name: str, value):
  """Numpy scalars / arrays / tuples -> plain JSON types, so metadata never fails late inside json.dumps."""
  if isinstance(value, dict):
    return {str(k): _json_ready(f"{name}[{k!r}]", v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(name, v) for v in value]
  if isinstance(value, np.ndarray):
    return _json_ready(name, value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise ValueError(f"{name}={value!r} ({type(value).__name__}) cannot be stored in the export's JSON metadata; "
                   "pass numbers, strings, lists or dicts of them.")


def export_classifier(path, module_name: str, model_kwargs: dict, variables: Any, mean: Sequence[float],
                      std: Sequence[float], num_classes: int, image_shape: Sequence[int],
                      extra_metadata: dict | None = None) -> pathlib.Path:
  """Writes a classifier export that ``load_classifier`` reads (the format training and the converter share).

  Args:
    path: directory to write (overwritten if it exists).
    module_name: registry name in ``scoresmooth_jax.models.MODELS``, e.g. "cifar_resnet" or "resnet50".
    model_kwargs: JSON-serialisable constructor keywords, e.g. ``{"depth": 20, "num_classes": 10,
      "shortcut": "A"}``. Not ``dtype``: the compute dtype is chosen when loading.
    variables: ``{"params": ..., "batch_stats": ...}`` of the model (host or device arrays).
    mean, std: per-channel normalisation of images in [0, 1].
    num_classes: number of logits.
    image_shape: (H, W, C) of the images the classifier takes.
    extra_metadata: more JSON-serialisable facts to keep (source checkpoint, accuracy, config, ...).

  Returns:
    The absolute path of the export.
  """
  models.get_constructor(module_name)  # an unknown name fails here, listing the known ones
  model_kwargs = dict(model_kwargs)
  if "dtype" in model_kwargs:
    raise ValueError(f"model_kwargs has dtype={model_kwargs['dtype']!r}: the compute dtype is not part of an "
                     "export; drop it and pass compute_dtype to load_classifier instead.")
  shape = _image_shape(image_shape)
  # Validated the same way loading will, so a bad export cannot be written.
  mean, std = _normalisation(mean, std, shape[-1])
  num_classes = _num_classes(num_classes)
  if model_kwargs.get("num_classes", num_classes) != num_classes:
    raise ValueError(f"num_classes={num_classes} disagrees with model_kwargs['num_classes']="
                     f"{model_kwargs['num_classes']}; pass the same number of classes to both.")
  extra = dict(extra_metadata or {})
  clash = sorted(set(extra) & set(_RESERVED_KEYS))
  if clash:
    raise ValueError(f"extra_metadata may not set {clash}: export_classifier writes those from its arguments.")
  metadata = {
      "kind": KIND,
      "model": module_name,
      "model_kwargs": _json_ready("model_kwargs", model_kwargs),
      "mean": list(mean),
      "std": list(std),
      "num_classes": num_classes,
      "image_shape": list(shape),
      **_json_ready("extra_metadata", extra),
  }
  host_variables = jax.tree.map(np.asarray, jax.device_get(variables))
  return checkpoint.save_model(path, host_variables, metadata)


def _check_variables(path, module, variables, shape) -> None:
  """Compares the restored tree with what the module expects, so a mismatched export fails with a list."""
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *shape), jnp.float32))
  flat_expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  flat_got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  missing = sorted(set(flat_expected) - set(flat_got))
  unexpected = sorted(set(flat_got) - set(flat_expected))
  misshaped = sorted(f"{k}: stored {flat_got[k]}, model needs {flat_expected[k]}"
                     for k in set(flat_got) & set(flat_expected) if tuple(flat_got[k]) != tuple(flat_expected[k]))
  if missing or unexpected or misshaped:
    raise checkpoint.CheckpointError(
        f"checkpoint {path}: the stored variables do not fit the model its metadata describes "
        f"(missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}); export it again.")


def load_classifier(path, compute_dtype=None, fold_batchnorm: bool = False) -> Classifier:
  """Loads a classifier export (from ``export_classifier``, training, or the PyTorch converter).

  Args:
    path: the export directory.
    compute_dtype: None (float32) or e.g. ``jnp.bfloat16`` / "bfloat16" for the network's computation.
    fold_batchnorm: fold BatchNorm into the convolutions (``Classifier.folded``) for faster inference. Off by
      default, so that ``clf.variables`` are the stored arrays bit for bit.

  Returns:
    A ``Classifier``: ``clf(x)`` maps [B, H, W, C] images in [0, 1] to float32 logits.
  """
  compute_dtype = _canonical_dtype(compute_dtype)
  variables, metadata = checkpoint.load_model(path, kind=KIND)
  missing = [k for k in _RESERVED_KEYS if k not in metadata]
  if missing:
    raise checkpoint.CheckpointError(f"checkpoint {path}: metadata lacks {missing}; it was not written by "
                                     "export_classifier, export it again.")
  module = models.get_model(metadata["model"], **metadata["model_kwargs"])
  shape = _image_shape(metadata["image_shape"])
  _check_variables(path, module, variables, shape)
  variables = jax.tree.map(jnp.asarray, variables)
  extra = {k: v for k, v in metadata.items() if k not in _RESERVED_KEYS}
  clf = Classifier(module=module, variables=variables, mean=metadata["mean"], std=metadata["std"],
                   num_classes=metadata["num_classes"], image_shape=shape, compute_dtype=compute_dtype,
                   metadata=extra)
  return clf.folded() if fold_batchnorm else clf


def _as_unit_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images have dtype {images.dtype}; pass uint8 in [0, 255] or floats in [0, 1].")
  return images.astype(np.float32)


def predict_logits(clf: Classifier, images, batch_size: int = 256) -> np.ndarray:
  """float32 logits [N, num_classes] of ``images`` (uint8 or floats in [0, 1], NHWC), batch by batch."""
  return _batched(clf, images, None, batch_size)


def accuracy(clf: Classifier, images, labels, batch_size: int = 256) -> int:
  """Number of ``images`` (uint8 or floats in [0, 1], NHWC) whose top-1 class equals ``labels``.

  Batches are sharded over the ``"data"`` mesh of this process's devices and run by one jitted program
  (compiled once: the last batch is padded and masked); the count stays on device until the end. Meant for
  scripts and tests on one host; multi-host evaluation belongs to the training / certification jobs.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f"labels has shape {labels.shape}; expected ({len(images)},), one label per image.")
  return int(_batched(clf, images, labels.astype(np.int32), batch_size))


def _batched(clf: Classifier, images, labels, batch_size: int):
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
  images = _as_unit_images(images)
  num = len(images)
  if num == 0:
    raise ValueError("no images given.")
  mesh = sharding.data_mesh(jax.local_devices())
  # Round up so every device gets an equal share of each batch.
  batch_size = -(-min(int(batch_size), num) // mesh.size) * mesh.size
  data_sharding = sharding.batch_sharding(mesh)
  variables = jax.device_put(clf.variables, sharding.replicated(mesh))

  if labels is None:
    step = jax.jit(lambda v, x: clf.apply(v, x), out_shardings=data_sharding)
    out = []
    for start in range(0, num, batch_size):
      chunk = images[start:start + batch_size]
      padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
      padded[:len(chunk)] = chunk
      out.append((step(variables, jax.device_put(padded, data_sharding)), len(chunk)))
    return np.concatenate([np.asarray(logits)[:n] for logits, n in out])

  @jax.jit
  def step(v, x, y, valid):
    hits = (jnp.argmax(clf.apply(v, x), axis=-1) == y) & valid
    return hits.sum(dtype=jnp.int32)

  correct = jnp.zeros((), jnp.int32)
  for start in range(0, num, batch_size):
    chunk = images[start:start + batch_size]
    padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
    padded[:len(chunk)] = chunk
    y = np.zeros((batch_size,), np.int32)
    y[:len(chunk)] = labels[start:start + batch_size]
    valid = np.arange(batch_size) < len(chunk)
    correct = correct + step(variables, *(jax.device_put(a, data_sharding) for a in (padded, y, valid)))
  return int(correct)


def format_accuracy(correct: int, total: int) -> str:
  """"N / M = xx.xx %", the accuracy line scripts print."""
  return f"{correct} / {total} = {100.0 * correct / total:.2f} %"


def load_eval_npz(path) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``images`` (uint8 or floats in [0, 1], NHWC) and ``labels`` from an .npz, never unpickling objects."""
  path = pathlib.Path(path).expanduser()
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in ("images", "labels") if k not in data.files]
      if missing:
        raise ValueError(f"{path} lacks arrays {missing} (has {data.files}); save it with "
                         "np.savez(path, images=NHWC uint8 or [0, 1] floats, labels=int class ids).")
      images, labels = data["images"], data["labels"]
  except FileNotFoundError:
    raise FileNotFoundError(f"evaluation file {path} does not exist.") from None
  if images.ndim != 4:
    raise ValueError(f"{path}: images has shape {images.shape}; expected NHWC [N, H, W, C].")
  if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: labels has shape {labels.shape} and dtype {labels.dtype}; expected integer "
                     f"class ids of shape ({len(images)},).")
  return images, labels
