"""Tensor parallelism over MindSpore's collectives (HCCL on Ascend, mccl on CPU), in processes
started by msrun.

Every rank builds the same model holding its slice of each weight (layers/ ask `tp_group()` and
`Shard` which slice); rank 0 alone schedules and samples, and sends each step's metadata to the
other ranks, which run the same compiled step (StepChannel).
"""
from __future__ import annotations

import os
import random
import shlex
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


class ParallelError(RuntimeError):
    """The ranks cannot work together (launch, sizes, or another rank's failure); one line."""


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # MoE: whole experts per rank, instead of a slice of every expert


_group = TPGroup()


def tp_group() -> TPGroup:
    return _group


def launched_by_msrun() -> bool:
    # msrun runs the program once per worker and once as its scheduler, whose init() serves the
    # cluster and never returns.
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def msrun_command(size: int, argv: list[str] | None = None, log_dir: str | None = None) -> list[str]:
    """The msrun command line that runs this program (or argv) on `size` local ranks; rank 0's
    output goes to the console, every rank's to log_dir. Multi-host: README."""
    argv = list(sys.argv if argv is None else argv)
    if log_dir is None:
        from .gguf import cache_root
        log_dir = os.path.join(cache_root(), "msrun_log")
    return ["msrun", f"--worker_num={size}", f"--local_worker_num={size}", "--master_addr=127.0.0.1",
            f"--master_port={reserved_port()}", "--join=True", "--cluster_time_out=120", "--tail_worker_log=0",
            f"--log_dir={log_dir}", *argv]


def reserved_port() -> int:
    """A free local port below the kernel's ephemeral range. Bind-close-reuse inside that range
    races with every process's outgoing connections, which take ports from it at random; below
    it only explicit binds compete."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(10000, ephemeral_low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def init_tensor_parallel(size: int, expert_parallel: bool = False) -> TPGroup:
    """Joins the msrun job as one of `size` ranks; size 1 is the single-process default."""
    global _group
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == _group.size:
        _group = TPGroup(_group.rank, size, expert_parallel)
        return _group
    if size == 1:
        _group = TPGroup()
        return _group
    if not launched_by_msrun():
        raise ParallelError(f"tensor_parallel_size={size} needs one process per rank, started by msrun: "
                           + shlex.join(msrun_command(size)))
    from mindspore.communication import get_group_size, get_rank, init
    init()
    if get_group_size() != size:
        raise ParallelError(f"tensor_parallel_size={size} but msrun started {get_group_size()} workers")
    _group = TPGroup(get_rank(), size, expert_parallel)
    return _group


# -- which slice of a checkpoint tensor a rank holds ------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Parameter[dest] = checkpoint_tensor[source], the tensor having full_shape."""
    full_shape: tuple
    source: tuple
    dest: tuple


def even_rows(n: int, what: str) -> slice:
    """Rank r's contiguous 1/size of n rows."""
    tp = tp_group()
    if n % tp.size:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size {tp.size}")
    per = n // tp.size
    return slice(tp.rank * per, (tp.rank + 1) * per)


def head_shards(num_heads: int, num_kv_heads: int) -> tuple[slice, slice]:
    """(query heads, KV heads) of this rank. With fewer KV heads than ranks, each rank keeps a
    copy of the one KV head its query heads read."""
    tp = tp_group()
    q = even_rows(num_heads, "attention heads")
    if num_kv_heads >= tp.size:
        return q, even_rows(num_kv_heads, "KV heads")
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp.size} is not a multiple of the KV heads ({num_kv_heads})")
    kv = tp.rank * num_kv_heads // tp.size
    return q, slice(kv, kv + 1)


def kv_heads_per_rank(num_kv_heads: int) -> int:
    return max(1, num_kv_heads // tp_group().size)


def vocab_rows(vocab_size: int) -> slice:
    """Rank r's rows of a vocab-parallel table: ceil(vocab/size) each, the last rank's padded."""
    tp = tp_group()
    per = -(-vocab_size // tp.size)
    return slice(tp.rank * per, min(vocab_size, (tp.rank + 1) * per))


# -- rank 0 -> the others: each step's metadata, and agreement on failure ----------------------
class StepChannel:
    """Broadcasts a list of int32 arrays from rank 0: a fixed-size header (count, total size,
    shapes) then one flat payload; a count of -1 tells the other ranks to stop."""

    HEADER = 64

    def __init__(self):
        from mindspore import ops
        self._broadcast = ops.Broadcast(0)

    def _bcast(self, array: np.ndarray) -> np.ndarray:
        from mindspore import Tensor
        return self._broadcast((Tensor(array),))[0].asnumpy()

    def send(self, arrays: list[np.ndarray]) -> None:
        header = [len(arrays), sum(a.size for a in arrays)]
        for a in arrays:
            header += [a.ndim, *a.shape]
        self._bcast(np.array(header + [0] * (self.HEADER - len(header)), np.int32))
        self._bcast(np.concatenate([a.astype(np.int32).ravel() for a in arrays]))

    def receive(self) -> list[np.ndarray] | None:
        header = self._bcast(np.zeros(self.HEADER, np.int32))
        count, total = int(header[0]), int(header[1])
        if count < 0:
            return None
        flat = self._bcast(np.zeros(total, np.int32))
        arrays, at, offset = [], 2, 0
        for _ in range(count):
            ndim = int(header[at])
            shape = tuple(int(d) for d in header[at + 1: at + 1 + ndim])
            at += 1 + ndim
            size = int(np.prod(shape))
            arrays.append(flat[offset: offset + size].reshape(shape))
            offset += size
        return arrays

    def close(self) -> None:
        self._bcast(np.array([-1] + [0] * (self.HEADER - 1), np.int32))


@contextmanager
def all_ranks_or_none():
    """Collective: the body's failure on any rank (a bad shard, a missing file) makes every rank
    raise, with the failing rank's message, instead of leaving the others waiting forever in
    their next collective for a rank that is gone."""
    if tp_group().size == 1:
        yield
        return
    error = None
    try:
        yield
    except (ValueError, TypeError, OSError, ParallelError) as e:
        error = e
    _agree(error)


def _agree(error: BaseException | None) -> None:
    from mindspore import Tensor, ops
    text = np.zeros(MESSAGE_BYTES, np.int32)
    if error is not None:
        encoded = (str(error) or type(error).__name__).encode()[:MESSAGE_BYTES - 1]
        text[0] = 1
        text[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    gathered = ops.AllGather()(Tensor(text.reshape(1, -1))).asnumpy()
    if error is not None:
        raise error
    for rank, row in enumerate(gathered):
        if row[0]:
            message = bytes(row[1:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
            raise ParallelError(f"rank {rank} failed: {message}")


MESSAGE_BYTES = 512
