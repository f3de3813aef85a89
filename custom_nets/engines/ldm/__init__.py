"""The latent generator stage: objective (flow matching / DDPM), training steps and export, factor sources, guided sampling."""
