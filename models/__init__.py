"""Model definitions (pure torch): config, layers, attention kinds, checkpoints, ReferenceModel."""
