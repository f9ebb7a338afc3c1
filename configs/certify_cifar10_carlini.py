"""Carlini et al. (2023)'s CIFAR-10 pipeline: improved-diffusion's 50M UNet (one step) + a Hugging Face ViT-B/16.

Their "(Certified!!) Adversarial Robustness for Free!" certifies 79.3 / 65.5 / 48.7 / 35.5 % at l2 radius
0.25 / 0.5 / 0.75 / 1.0 (best over sigma in 0.25, 0.5, 1.0) with cifar10_uncond_50M_500K.pt and
aaraki/vit-base-patch16-224-in21k-finetuned-cifar10, each 32 x 32 draw denoised in one step, resized to 224 x 224
with interpolate(mode="bicubic", antialias=True) and not clipped again, N = 100,000, n0 = 100, alpha = 0.001 on
every test image (their README's --skip 1). The classifier normalises with its image processor's mean / std
(0.5 / 0.5), recorded in the export. One difference: the denoiser is told exactly sigma (the fractional timestep
of ``modelio.openai_diffusion``) where their integer rule rounds up to the next step and adds noise g_t / 2 >= sigma;
``openai_diffusion.carlini_timestep`` gives their step (docs/openai.md tabulates both).

On a machine with internet (pip install huggingface_hub for the download only):
  mkdir -p models
  wget -P models https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_50M_500K.pt
  huggingface-cli download aaraki/vit-base-patch16-224-in21k-finetuned-cifar10 --local-dir models/vit-cifar10
Then, anywhere (torch only if the directory holds pytorch_model.bin rather than model.safetensors):
  python scripts/convert_torch_classifier.py --format=hf --checkpoint=models/vit-cifar10 \
      --output=workdirs/vit_b16_cifar10
  python scripts/certify.py --config configs/certify_cifar10_carlini.py --workdir workdirs/carlini_cifar10_s025 \
      --config.noise.sigma=0.25
The tiny variant (tests, CPU) certifies 2 images with few draws; tests point it at small random-weight models.
All keys: scoresmooth_jax.runtime.config_schema.certification_config.
"""

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  config = config_schema.certification_config()
  config.dataset.name = "cifar10"
  config.dataset.skip = 1
  config.classifier.path = "workdirs/vit_b16_cifar10"
  config.classifier.input = "resize"  # 32 x 32 draws -> the ViT's 224 x 224
  config.classifier.resize_method = "bicubic_antialias"
  config.classifier.resize_clip = False
  config.denoiser.kind = "one_step"
  config.denoiser.score = "openai:cifar10_uncond_50M_500K:models/cifar10_uncond_50M_500K.pt"
  config.noise.sigma = 0.25
  config.certify.n0 = 100
  config.certify.n = 100_000
  config.certify.alpha = 0.001
  config.certify.batch_size = 128  # per device: the UNet at 32 x 32 plus ViT-B/16 at 224 x 224 per draw
  if variant == "tiny":
    config.dataset.max = 2
    config.certify.n0 = 8
    config.certify.n = 16
    config.certify.batch_size = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of certify_cifar10_carlini: use '' or 'tiny'.")
  config.lock()
  return config
