"""Training of packforcing's learned components: :mod:`packforcing.training.compressor` fits
the ``dual_branch`` compressor (``train_compressor``; CLI ``python -m packforcing.training.compressor``)."""
