"""What every run needs around the trainer: the LightningCLI subclass, launching, signal/NaN safety, run
directories and loggers, batch-size logging."""
