"""Structural compression steps of the layer stream (see converter/stream.py)."""
