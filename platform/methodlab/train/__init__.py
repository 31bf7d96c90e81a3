"""Training: the driver (`launch`) and the shared worker loop (`loop`)."""
