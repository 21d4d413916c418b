"""What the real TPU and GPU compilers say of a config's train step, on this host with no accelerator:
targets (TPU topologies and GPU hosts as compile-only devices), step (compile the run's or a swarm's step),
estimate (the compiler's cost model corrected for its blind spots), plan (`mixlm plan --compile-for`) and report
(its text)."""
