"""How the package runs on the machine: the device mesh (``sharding``), the per-device batch size of Monte-Carlo
sampling (``batching``), the XLA:CPU flags of the scripts (``xla_cpu``) and loading ``configs/`` files outside
absl (``configs_util``).

Nothing is imported here: ``smoothing`` imports ``sharding`` when the package is imported, and that must stay
cheap.
"""
