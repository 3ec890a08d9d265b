"""autocomp: hardware-aware automatic compression of PyTorch models."""

__version__ = "0.1.0"
