"""Adapters: LoRA-family weight deltas (kohya, LyCORIS, diffusers/PEFT) and textual-inversion embeddings."""
