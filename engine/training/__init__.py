"""Training code: the VAE, and the text encoder with the U-Net on eps-prediction (the seed of fine-tuning/LoRA)."""
