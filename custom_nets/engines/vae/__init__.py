"""The VAE stage: training step, exporter, latent cache encoding and decoding."""
