"""Gemma 3 on MLX."""
