"""Launchers that start `mixlm train` (or a proxy sweep) on many processes, kept out of the library.
Run each by path, or through `mixlm launch WHERE`; each has --help and --dry-run.

    local.py   N jax.distributed processes on this machine (python launch/local.py -n 2 -- train CONFIG)
    tpu.py     every worker of a Cloud TPU VM slice, over gcloud ssh; optionally owns the slice: creates
               it (queued resource) or reuses it, installs mixlm (git ref or wheel), deletes it on exit
    slurm.py   an sbatch script: one task per GPU, srun ... --distributed
    sweep.py   a proxy sweep as a SLURM job array: task I runs `mixlm sweep ... [--swarm S] --shard I/K`
    common.py  what they share: the command check, quoting of user strings for shell and #SBATCH lines,
               sbatch header, argument helpers, error handling

The library keeps only `jax.distributed` initialisation (`mixlm train --distributed` or
`--coordinator/--num-processes/--process-id`); these scripts only build and run those command lines.
"""
