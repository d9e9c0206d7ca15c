"""Where and how the computation runs: the device and autocast, torchrun/DDP helpers, seeded
random streams, the no-host-sync guard, Slurm requeueing. Imports only errors/atomic/progress."""
