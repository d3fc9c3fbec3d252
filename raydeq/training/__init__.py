"""Training: config and its schema, objective, checkpoint, state, reporting, the per-worker
loop, launch (Ray Train), preflight checks, storage, and the data (data, vision)."""
