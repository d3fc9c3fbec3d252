"""Experiments on Ray Tune: experiment files -> trials (spec), Tuner and resume (run), reports
kept across resumes (archive), tables and plots (results)."""
