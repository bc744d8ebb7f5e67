"""Training: the loop (`loop`), the jitted step (`step`), batches (`inputs`), the optimizer (`optim`), logs (`log`) and preemption."""
