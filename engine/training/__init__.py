"""Generic trainers: the VAE, the text encoder with the U-Net on eps-prediction (the bundled model), and brand
fine-tuning of a loaded model on a folder of photos: LoRA (lora_layers, lora_trainer, lora_export), textual
inversion (embedding_trainer, embedding_export) and DreamBooth with prior preservation (class_images,
dreambooth_trainer), sharing image_set, buckets and caption_encoding; and a ControlNet for a loaded model on
(image, control image, caption) triples (controlnet_trainer).

A trainer takes its data from the caller (a batch iterator, a ``sample_batch(n, generator)`` callable or an
:class:`~engine.training.image_set.ImageSet` read from a folder the caller names) and knows no dataset of ours; the
bundled demo model's recipe and data live in the top-level ``demo`` package.
"""
