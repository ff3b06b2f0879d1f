"""What every trainer of this package shares: the run core (seed, schedule, settings, run record, resume, logging of
the loss parts), the output-space distillation trainer built on it, and the checkpoint files they read."""
