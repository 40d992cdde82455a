"""Models: image tower (timm), text tower (transformers), projections and temperature."""
