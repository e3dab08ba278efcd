"""Plumbing for the tests that run two gloo processes: a free port, and a process group that closes
only once every rank is done (a rank that closes while its peer still finishes the last collective
makes gloo abort the peer with SIGABRT)."""
from __future__ import annotations

import contextlib
import datetime
import socket

import torch.distributed as dist

from golf.dist import teardown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    # a short timeout turns a rank stuck on a failed peer into an error instead of a 30-minute hang
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        yield
    finally:
        teardown()
