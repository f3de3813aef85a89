"""The MeDUET pretraining stage: training step, streamed re-encoding, network arguments, factor bank, style swaps, disentanglement probes."""
