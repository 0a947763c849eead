"""The console's views. Each reads the one fleet model (``console.fleet``) and nothing else."""
