"""Carlini et al. (2023)'s ImageNet pipeline: guided-diffusion's 256 x 256 UNet (one step) + timm's BEiT-L/16 at 512.

Their "(Certified!!) Adversarial Robustness for Free!" certifies 71.1 / 54.3 / 38.1 / 29.5 / 13.1 % at l2 radius
0.5 / 1.0 / 1.5 / 2.0 / 3.0 (best over sigma in 0.25, 0.5, 1.0) with 256x256_diffusion_uncond.pt and
beit_large_patch16_512, each draw denoised in one step, resized to 512 x 512 with interpolate(mode="bicubic",
antialias=True) and not clipped again, N = 10,000, n0 = 100, alpha = 0.001 on every 50th validation image (their
README). BEiT normalises with mean = std = 0.5, recorded in the export. Two differences: images here are the
central 256 x 256 crop (the UNet's training size; they crop 224 and run the UNet at 224), so radii are in that
image's pixels; and the denoiser is told exactly sigma (``modelio.openai_diffusion``) where their integer rule
rounds up to the next step (``openai_diffusion.carlini_timestep``).

On a machine with internet (pip install torch timm for the download only):
  mkdir -p models
  wget -P models https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt
  python -c "import timm, torch; torch.save(timm.create_model('beit_large_patch16_512', pretrained=True)\
.state_dict(), 'models/beit_large_patch16_512.pth')"
Then, anywhere (with torch, to read the .pth):
  python scripts/convert_torch_classifier.py --format=timm --arch=beit_large_patch16_512 \
      --checkpoint=models/beit_large_patch16_512.pth --output=workdirs/beit_large_patch16_512
  python scripts/certify.py --config configs/certify_imagenet_carlini.py --workdir workdirs/carlini_imagenet_s050 \
      --config.noise.sigma=0.5
The data must be prepared with tfds beforehand (README). The tiny variant (tests, CPU) certifies 2 mock images at
64 x 64 (a small UNet) before a 32 x 32 BEiT, so the resize shrinks; tests point it at small random-weight models.
All keys: scoresmooth_jax.runtime.config_schema.certification_config.
"""

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  config = config_schema.certification_config()
  config.dataset.name = "imagenet2012"
  config.dataset.split = "validation"
  config.dataset.image_size = 256  # shorter side to 256, central crop: the UNet's training size
  config.dataset.skip = 50
  config.classifier.path = "workdirs/beit_large_patch16_512"
  config.classifier.input = "resize"  # 256 x 256 draws -> BEiT's 512 x 512
  config.classifier.resize_method = "bicubic_antialias"
  config.classifier.resize_clip = False
  config.denoiser.kind = "one_step"
  config.denoiser.score = "openai:256x256_diffusion_uncond:models/256x256_diffusion_uncond.pt"
  config.noise.sigma = 0.5
  config.certify.n0 = 100
  config.certify.n = 10_000
  config.certify.alpha = 0.001
  config.certify.batch_size = 8  # per device: a 553M-parameter UNet at 256 and BEiT-L at 512 per draw
  if variant == "tiny":
    config.dataset.image_size = 64
    config.dataset.skip = 1
    config.dataset.max = 2
    config.certify.n0 = 8
    config.certify.n = 16
    config.certify.batch_size = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of certify_imagenet_carlini: use '' or 'tiny'.")
  config.lock()
  return config
