"""Generic trainers: the VAE, and the text encoder with the U-Net on eps-prediction (the seed of fine-tuning/LoRA).

A trainer takes its data from the caller (a batch iterator or a ``sample_batch(n, generator)`` callable) and knows no
dataset of ours; the bundled demo model's recipe and data live in the top-level ``demo`` package.
"""
