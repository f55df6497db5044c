"""Training orchestration: run config, LightningModule, run directories."""
