"""Models on disk as JAX callables: Orbax exports (``checkpoint``), the base classifier and its export format
(``classifier``), our score-model exports (``export``), published score_sde and OpenAI diffusion checkpoints
(``pretrained``, ``openai_diffusion``) and PyTorch classifier checkpoints (``convert``).

Nothing is imported here, so importing one module does not pull in the others (``convert`` never needs torch
until it reads a file).
"""
