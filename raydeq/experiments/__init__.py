"""Experiments on Ray Tune: experiment files -> trials (spec), Tuner and resume (run), results."""
