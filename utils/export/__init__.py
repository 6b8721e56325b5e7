"""Export of a trained student out of PyTorch (placeholder docstring)."""
