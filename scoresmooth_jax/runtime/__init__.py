"""How the package runs on the machine: the device mesh (``sharding``), the per-device batch size of Monte-Carlo
sampling (``batching``), the XLA:CPU flags of the scripts (``xla_cpu``), the keys of ``configs/`` files
(``config_schema``, without JAX) and loading those files outside absl (``configs_util``).

Nothing is imported here: ``smoothing`` imports ``sharding``, and ``configs/`` files import ``config_schema``;
both must stay cheap.
"""
