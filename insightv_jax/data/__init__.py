"""Data: chat templates, images, the synthetic suite, sources, loaders and preference pairs."""
