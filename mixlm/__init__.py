"""mixlm: JAX/Flax pretraining for data-mixture and data-selection research."""

from mixlm.worker_devices import quiet_idle_tpu_plugin

__version__ = "0.1.0"

quiet_idle_tpu_plugin()  # an installed libtpu on a host with no TPU: JAX on CPU, without its TPU errors
