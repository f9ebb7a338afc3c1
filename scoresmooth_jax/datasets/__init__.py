"""Image data for training and certification: ``data.get_source(name, split)`` (the embedded digits,
``npz:`` files, tfds datasets, ``folder:`` image folders) and the sharded batches built from a source. The
sources themselves live in ``sources`` and ``image_folder``.

The embedded digits stay in the package's ``data/`` folder (package data, no code).
"""
