"""The segmentation stage: the network from its checkpoints, training, style augmentation, whole-volume latent inference."""
