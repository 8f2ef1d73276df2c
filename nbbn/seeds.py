"""The one seeding rule of every nbbn tool: a configuration draws from its own generator,
``SeedSequence(seed, spawn_key=crc32 of each part of its key)``, so its numbers depend only on
(seed, key), never on which other configurations ran or in what order."""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, *key) -> np.random.Generator:
    """The generator of the configuration ``key`` under the run's ``seed``."""
    spawn_key = tuple(zlib.crc32(repr(k).encode()) for k in key)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=spawn_key)))
