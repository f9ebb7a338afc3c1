"""The keys of the two kinds of ``configs/*.py`` file, as plain ``ml_collections`` data: ``training_config`` for
``scripts/train_{score,classifier}.py`` (read by ``training.train``) and ``certification_config`` for
``scripts/certify.py`` / ``predict.py`` (read by ``certification.certify_job``).

Promises: this module imports ml_collections and nothing of JAX, so a config file builds without loading JAX,
Flax, Optax or Orbax (tests/test_config_files.py checks every variant of every file).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

TASKS = ("score", "classifier")

# The annealed denoiser's schedule by default: denoise.DEFAULT_* (this module may not import denoise, which
# imports JAX; tests/test_config_files.py checks that the two agree).
ANNEALED_DEFAULTS = dict(sigma_min=0.01, num_levels=10, steps_per_level=3, relative_step=0.5)


def training_config(task: str, dataset: str, image_shape, *, random_flip: bool, random_crop_padding: int = 0):
  """The skeleton every ``configs/{score,classifier}_*.py`` fills in: every key ``train_and_evaluate`` reads.

  Values most experiments share are set here; the ones each experiment must choose (model, learning rate,
  batch sizes, step counts, intervals, normalisation) are placeholders (None) that the config file sets.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r}: choose one of {TASKS}.")
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.distributed = False       # True on multi-host TPU/GPU: joins the cluster (JAX detects it)
  config.report_only = False       # print parameters and FLOPs, then stop
  config.data = ml_collections.ConfigDict(dict(
      name=dataset, train_split="train", eval_split="test", data_dir=placeholder(str),
      eval_name=placeholder(str),  # the evaluation dataset when it is not `name` (e.g. a folder with no test split)
      image_size=placeholder(int), image_shape=tuple(image_shape), random_flip=random_flip,
      random_crop_padding=random_crop_padding,
      in_memory=False))  # decode the training split once into host memory (data.load_into_memory)
  config.model = ml_collections.ConfigDict(dict(name=placeholder(str), kwargs=ml_collections.ConfigDict()))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=placeholder(float), warmup_steps=placeholder(int), schedule="constant", grad_clip=1.0,
      weight_decay=0.0, ema_decay=placeholder(float)))
  config.train = ml_collections.ConfigDict(dict(
      batch_size=placeholder(int), num_steps=placeholder(int),
      steps_per_dispatch=1,  # XLA:CPU runs convs in loop bodies slowly (train_state.py); raise it on TPU/GPU
      log_every=placeholder(int), eval_every=placeholder(int), checkpoint_every=placeholder(int),
      keep_checkpoints=2,
      init_from=""))  # an export dir (or a shipped score model's name) to start from (warm_start.py)
  eval_common = dict(batch_size=placeholder(int), num_examples=placeholder(int))
  if task == "score":
    config.sigma = ml_collections.ConfigDict(dict(sigma_min=0.01, sigma_max=1.0,
                                                  num_scales=0,  # 0: continuous, log-uniform sigma
                                                  focus_min=0.0, focus_prob=0.0))  # losses.SigmaDistribution
    config.eval = ml_collections.ConfigDict(dict(**eval_common, sigmas=(0.12, 0.25, 0.5, 1.0), loss_buckets=4))
  else:
    config.noise_sigma = 0.0         # Gaussian augmentation in [0, 1] pixel space; 0 = plain training
    config.normalization = ml_collections.ConfigDict(dict(mean=placeholder(tuple), std=placeholder(tuple)))
    config.optim.ema_decay = 0.0     # BatchNorm statistics track the raw parameters; evaluate those
    config.eval = ml_collections.ConfigDict(dict(**eval_common, noise_sigmas=(0.25, 0.5)))
  return config


def certification_config():
  """The config every ``configs/certify_*.py`` starts from (each key is read by ``certify_job.JobSpec``)."""
  config = ml_collections.ConfigDict()
  config.mode = "certify"          # certify | predict (scripts/predict.py sets predict)
  # Multi-host: one process per host, each certifies its own images. Empty values: JAX detects the cluster.
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1))
  config.dataset = ml_collections.ConfigDict(dict(
      name="digits",               # digits | npz:/path.npz | folder:/path (PATH/<split>/<class>/*.jpg) | a tfds name
      split="test",
      data_dir="",                 # tfds data_dir ("" for the default)
      image_size=0,                # resize tfds images to this size (0: as stored)
      skip=1,                      # Cohen's --skip: every skip-th image
      max=-1,                      # Cohen's --max: only indices below this (-1: all)
  ))
  config.classifier = ml_collections.ConfigDict(dict(
      path="",                     # a classifier export (training or scripts/convert_torch_classifier.py)
      compute_dtype="float32",     # float32 | bfloat16 (certify in the precision you deploy)
      # Fold BatchNorm into the convolutions of a ResNet (12 % faster for ResNet-110 on CPU; the same logits to
      # float rounding, like a change of batch size). Other networks run as they are.
      fold_batchnorm=True,
      # How denoised images reach a classifier trained at another size (e.g. a 256 x 256 diffusion model before a
      # 224 x 224 ResNet-50): none (sizes must match) | center_crop | resize (PyTorch's interpolate, resize.METHODS,
      # clipped to [0, 1] or not). After the denoiser, so part of the base classifier (the certificate is for the
      # dataset-size input).
      input="none",
      resize_method="bicubic_antialias",
      resize_clip=True,
  ))
  config.denoiser = ml_collections.ConfigDict(dict(
      kind="annealed",             # none | one_step | annealed
      score="",                    # export dir, shipped name, score_sde:<preset>:<ckpt> or openai:<preset>:<pt>
      # annealed: geometric schedule from noise.sigma down to sigma_min in num_levels levels of steps_per_level
      # steps, step a_i = relative_step * sigma_i^2 (the denoise module docstring)
      **ANNEALED_DEFAULTS,
      # float32 | bfloat16: the score network's compute dtype (parameters stay float32; the noise, the denoiser's
      # arithmetic and the statistics do not change). bfloat16 runs on GPU / TPU tensor cores.
      compute_dtype="float32",
  ))
  config.noise = ml_collections.ConfigDict(dict(type="gaussian", sigma=0.25))
  # batch_size is per device per loop step; 0 picks the largest power of two whose sampling step XLA estimates to
  # fit half the device's memory (batching.auto_batch_size). On a CPU a smaller batch is often faster.
  config.certify = ml_collections.ConfigDict(dict(n0=100, n=10_000, alpha=0.001, batch_size=1000, seed=0))
  # Sequential certification (sequential.certify_sequential): certify.n becomes the budget n_max and each image
  # stops once its answer is settled, with the same guarantee. radius >= 0: decision mode (certified at that
  # radius, or not). Else radius mode: give the radii you report (e.g. (0.0, 0.25, 0.5)) and each image stops
  # once more draws could not change at which of them it is certified; max_radius > 0 stops images certified
  # that far; tolerance >= 0 stops once more draws could add at most that radius (-1: 0 with radii, else 5 % of
  # the largest radius n draws can certify).
  config.certify.sequential = ml_collections.ConfigDict(dict(
      enabled=False, radius=-1.0, radii=(), max_radius=-1.0, tolerance=-1.0, first_look=100))
  return config
