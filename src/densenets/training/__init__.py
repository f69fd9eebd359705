"""Training: recipes as data, datasets and loaders, the loop, evaluation, checkpoints, DDP."""
