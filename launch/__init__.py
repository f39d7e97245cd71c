"""Thin wrappers over the deepspeed launcher and the demo."""
