"""The small world's research code (world, detector, datasets, base trainer, experiment)."""
