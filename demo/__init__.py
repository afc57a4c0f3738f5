"""The bundled demo model (models/adforge-demo.safetensors): its procedural captioned scenes, its recipe as data
(recipe.yaml), the training that runs it, the pixel evaluator that scores renders, and its history (NOTES.md).

It uses the engine's networks and generic trainers (engine.training); the engine never imports it.
"""
