"""Training: config, objective, checkpoint, state, reporting, loop, launch, data."""
