"""The seeds of a run's random streams, each drawn from the run's seed and a key of its own.

The run's seed itself seeds the initial weights (torch.manual_seed(seed)); every other stream
takes `stream_seed(seed, stream, ...)`, so that a stream of one seed is a stream of another
only by a chance of 1 in 2^32 (torch's CPU generator keeps the low 32 bits of a seed), where a
sum such as seed + 1 + rank gives seed 0's second worker the stream of seed 1's first.
"""

from __future__ import annotations

import numpy as np

# The streams' first key word: tells a worker's or a sample's stream from any other drawn
# from the seed (an epoch's order draws from SeedSequence((seed, epoch)), no spawn key).
WORKER_STREAM = 1
AUGMENTATION_STREAM = 2


def stream_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for the stream `key` of the run seeded `seed`: a hash of both, numpy's
    SeedSequence with `key` as its spawn key, which tells keys of any length apart (numpy's
    SeedSequence((seed, epoch)) is SeedSequence((seed, epoch, 0)), a trailing 0 dropped)."""
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0])
