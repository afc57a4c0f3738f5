"""The bundled demo model's world: a procedural captioned dataset and the pixel evaluator that scores renders."""
