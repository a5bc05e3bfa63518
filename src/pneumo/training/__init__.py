"""Training: run setup, phases of one-cycle epochs, cached features, the LR range test, the run's end."""
