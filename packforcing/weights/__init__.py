"""Weights shipped with packforcing, referred to from YAML as ``pkg:NAME`` (e.g.
``compressor: {name: dual_branch, weights: pkg:dual_branch_tiny.safetensors}``)."""
