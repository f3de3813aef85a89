"""The MeDUET pretraining stage: training step, loaders, factor bank, style swaps, disentanglement probes."""
