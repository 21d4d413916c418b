"""mixlm: JAX/Flax pretraining for data-mixture and data-selection research."""

__version__ = "0.1.0"
