"""Training: config and its schema, objective, checkpoint, state, reporting, the per-worker
loop, launch (Ray Train), Ctrl-C and SIGTERM in the commands (interrupts), preflight checks,
storage and TensorBoard events on it (eventlog), and the data (data, vision; image folders
listed once in folders, staged to local disk in staging)."""

from raydeq.training.state import load_model

__all__ = ["load_model"]
