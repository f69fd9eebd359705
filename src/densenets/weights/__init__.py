"""Weights in and out: checkpoint files and their key maps, torchvision's published weights."""
