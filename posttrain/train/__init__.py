"""Training: the harness, trainer args, launch, multi-process work, the memory planner, methods."""
