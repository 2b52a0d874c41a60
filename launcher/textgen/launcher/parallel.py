"""Settings the launcher decides for a tensor-parallel group of shards.

The rendezvous port defaults to a free one, so two launchers on one machine
do not collide on TGI's fixed 29500. On CPU the shards share the cores: each
gets an equal part, since N shards of all-cores threads would oversubscribe
them and spin against each other at every all-reduce.
"""

from __future__ import annotations

import os
import socket


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the shard of rank 0 binds it moments later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def threads_per_shard(num_shard: int) -> int | None:
    """Cores // num_shard (at least 1).

    None keeps the shard's own default: a single shard (torch picks its
    threads), or a user's OMP_NUM_THREADS, which the shards inherit.
    """
    if num_shard == 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(os.sched_getaffinity(0)) // num_shard)
