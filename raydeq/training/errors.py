"""The mark of an error that a restart of the run meets again."""

from __future__ import annotations


class Recurring(Exception):
    """An error that a restart of the run from its checkpoints raises again, identically (settings
    refused, no checkpoint readable, a divergence on record, a data folder missing): Ray Train
    ends the run on it at once (`launch.NoRestart`) instead of restarting its workers
    scaling.max_failures times; one raised with `recurs=False` may not recur (a download that
    failed) and is restarted as any other error."""

    def __init__(self, *args: object, recurs: bool = True) -> None:
        super().__init__(*args)
        self.recurs = recurs
