"""Training: the G&P update on a live model, distributed."""
