"""Ray Tune sweeps over fusion strategies and hyperparameters."""
