"""The segmentation stage: training, style augmentation, whole-volume latent inference."""
