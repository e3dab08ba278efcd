"""Process-group plumbing kept out of the model: rank discovery, collectives, failure propagation.

Works as a single process (`python train_gpt.py`) and under torchrun with NCCL (GPUs) or gloo (CPU).
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer (set by torchrun)") from None


def setup(timeout_s: float = 300.0) -> DistInfo:
    """Reads torchrun's variables, picks the device and joins the process group when there are ranks."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local, device)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on some rank (keeps stopping decisions in lockstep)."""
    t = torch.tensor(int(flag), device=device)
    return bool(all_reduce_(t, "max").item())


def broadcast_bytes(data: bytes, device: torch.device) -> bytes:
    """Rank 0's `data` on every rank (others pass anything); a no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return data
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    if size.item() == 0:  # torch.frombuffer refuses an empty buffer
        return b""
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return buf.cpu().numpy().tobytes()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Waits for every rank before closing the group: gloo aborts a rank that tears down while a peer
    (rank 0 writing the artifact) still holds the connection."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_main(main: Callable[[], None]) -> None:
    """Runs `main`; an exception on any rank prints its traceback tagged with the rank and exits that
    process at once (no clean shutdown that would wait on peers stuck in a collective). torchrun then
    stops the remaining ranks, so one failing rank ends the whole run with its error shown."""
    try:
        main()
    except BaseException as e:  # noqa: BLE001 - every failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        rank = os.environ.get("RANK", "0")
        sys.stdout.flush()
        sys.stderr.write(f"[rank {rank}] run failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)
    teardown()
