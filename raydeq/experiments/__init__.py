"""Experiments on Ray Tune: experiment files -> trials (spec), spaces in YAML (primitives), Optuna
searchers with conditional dimensions (search), Tuner and resume (run), reports kept across
resumes (archive), tables and plots (results), the accuracy-against-cost front (pareto) and
TensorBoard's HParams view (hparams)."""
