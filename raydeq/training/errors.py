"""The mark of an error that a restart of the run meets again."""

from __future__ import annotations


class Recurring(Exception):
    """An error that a restart of the run from its checkpoints raises again, identically (settings
    refused, no checkpoint readable, a divergence on record): Ray Train ends the run on it at once
    (`launch.NoRestart`) instead of restarting its workers scaling.max_failures times."""
