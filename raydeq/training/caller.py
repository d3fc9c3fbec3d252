"""What a command's main puts back on return for the Python process that called it (a
notebook, a script): no Ray of the command's own left running, and the environment, the
loggers' levels and filters and the random streams as it found them."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch


def loggers() -> dict[str, logging.Logger]:
    """Every logger the process has made, the root logger under ""."""
    made = logging.root.manager.loggerDict.items()
    return {"": logging.root} | {n: lg for n, lg in made if isinstance(lg, logging.Logger)}


def ray_running() -> bool:
    """Whether this process is connected to a Ray (without importing Ray where none was)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextlib.contextmanager
def process_kept() -> Iterator[None]:
    """Shut down on exit a Ray that was started inside, where none ran on entry, and put back
    the environment, the levels and filters of the loggers there on entry, and the torch,
    Python and NumPy random streams: a run called from a notebook left the Ray it started
    running (its processes and the driver's connection), ray.init's PYTHONBREAKPOINT and the
    command's RAY_* and TUNE_* variables set, the `ray` logger at WARNING, one more log filter
    per call, and the caller's random draws moved (the preflight's model is drawn from the
    global stream). A caller's own Ray, connected on entry, is kept."""
    environ = dict(os.environ)
    levels = {name: (lg.level, list(lg.filters)) for name, lg in loggers().items()}
    streams = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    had_ray = ray_running()
    try:
        yield
    finally:
        if not had_ray and ray_running():
            with contextlib.suppress(KeyboardInterrupt):  # Ray's exit handler ends it then
                sys.modules["ray"].shutdown()
        made = loggers()
        for name, (level, filters) in levels.items():
            made[name].setLevel(level)
            made[name].filters = filters
        for name in os.environ.keys() - environ.keys():
            del os.environ[name]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        torch.random.set_rng_state(streams[0])
        random.setstate(streams[1])
        np.random.set_state(streams[2])
