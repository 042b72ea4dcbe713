"""Wan2.1 models through diffusers: the transformer adapter, the VAE codec and the text encoder."""
