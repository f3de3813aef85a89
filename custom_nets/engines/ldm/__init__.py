"""The latent generator stage: flow-matching objective and training, factor sources, guided sampling."""
