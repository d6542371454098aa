"""Where this process sits in a multi-process run, read from what launchers set (framework-free).

torchrun and cluster launchers describe a run through environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); TensorFlow through TF_CONFIG. This module parses
them, checks them against the command line, and waits for a master address a bounded time, so a wrong
value stops with one line instead of a hang inside a collective.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from edgetl.errors import UserError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class WorldEnv:
    """This process's place in the run; `launched` is False for a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_master(value: str) -> tuple[str, int]:
    """"ADDR:PORT" → (addr, port); IPv6 addresses go in brackets ([::1]:29500)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--master {value!r} is not ADDR:PORT; valid: e.g. 10.0.0.1:29500 (port 1-65535)")
    return host, int(port)


def _int_env(env: dict[str, str], key: str) -> int | None:
    raw = env.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment {key}={raw!r} is not an integer; launchers set it to a process index") from None


def world_from_env(env: dict[str, str] | None = None) -> WorldEnv:
    """Read and check the torchrun-style variables; none set means a single process."""
    env = dict(os.environ if env is None else env)
    rank, size = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
    if rank is None and size is None:
        return WorldEnv()
    if rank is None or size is None:
        given, missing = ("RANK", "WORLD_SIZE") if size is None else ("WORLD_SIZE", "RANK")
        raise UserError(f"environment sets {given} but not {missing}; a launcher must set both (or neither)")
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"environment RANK={rank} WORLD_SIZE={size} is inconsistent; valid: 0 <= RANK < WORLD_SIZE")
    local_rank = _int_env(env, "LOCAL_RANK")
    local_rank = rank if local_rank is None else local_rank
    local_size = _int_env(env, "LOCAL_WORLD_SIZE")
    local_size = size if local_size is None else local_size
    if not 0 <= local_rank < local_size <= size:
        raise UserError(f"environment LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_size} WORLD_SIZE={size} is "
                        "inconsistent; valid: 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE")
    addr = env.get("MASTER_ADDR")
    port = _int_env(env, "MASTER_PORT")
    if size > 1 and (not addr or port is None):
        raise UserError(f"environment WORLD_SIZE={size} but MASTER_ADDR/MASTER_PORT are not both set; "
                        "start edgetl with torchrun or set them to node rank 0's address")
    return WorldEnv(rank, size, local_rank, local_size, addr, port, launched=True)


def check_world(world: WorldEnv, devices: int, nnodes: int, node_rank: int) -> None:
    """A launched process must agree with the command line's --devices / --nnodes / --node-rank."""
    if not world.launched:
        return
    if (devices, nnodes) != (1, 1) and world.size != devices * nnodes:
        raise UserError(
            f"environment WORLD_SIZE={world.size} but --devices {devices} × --nnodes {nnodes} = {devices * nnodes}; "
            "give matching values (or leave the flags out when a launcher sets the environment)"
        )
    if devices > 1 and world.local_size != devices:
        raise UserError(
            f"environment LOCAL_WORLD_SIZE={world.local_size} but --devices {devices}; give matching values"
        )
    if nnodes > 1 and world.rank // world.local_size != node_rank:
        raise UserError(f"environment RANK={world.rank} (LOCAL_WORLD_SIZE={world.local_size}) is on node "
                        f"{world.rank // world.local_size}, but --node-rank {node_rank}; give matching values")


def wait_for_master(addr: str, port: int, timeout: float, what: str = "master") -> None:
    """Connect to ADDR:PORT, retrying until `timeout` seconds; one clear line if it never answers."""
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror as error:
        raise UserError(f"{what} address {addr!r} does not resolve ({error.strerror}); give node rank 0's "
                        "host name or IP address") from None
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(0.1, timeout))):
                return
        except OSError as error:
            last = error.strerror or str(error)
        if time.monotonic() >= deadline:
            raise UserError(
                f"{what} {addr}:{port} did not answer within {timeout:g} s ({last}); start node rank 0 first, "
                "check the address and that the port is open (--master-timeout sets the wait)"
            )
        time.sleep(0.5)


def check_port_free(port: int) -> None:
    """Node rank 0 hosts the rendezvous on this port; a port in use would fail later inside the launcher."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise UserError(f"--master port {port} cannot be opened on this machine (node rank 0): "
                            f"{error.strerror}; choose a free port") from None


def tf_config_workers(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(worker count, this task's index) from TF_CONFIG, or None when it is not set."""
    env = dict(os.environ if env is None else env)
    raw = env.get("TF_CONFIG")
    if not raw:
        return None
    try:
        payload = json.loads(raw)
        workers = list(payload["cluster"].get("worker", [])) + list(payload["cluster"].get("chief", []))
        task = payload["task"]
        index = int(task["index"])
        kind = task["type"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"TF_CONFIG is not valid ({type(error).__name__}: {error}); expected "
                        '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}') from None
    if kind not in ("worker", "chief"):
        raise UserError(f"TF_CONFIG task type {kind!r} is not supported; valid: worker, chief")
    if not workers or not 0 <= index < len(payload["cluster"].get(kind, [])):
        raise UserError(f"TF_CONFIG task index {index} does not fit its cluster of {len(workers)} worker(s)")
    # the chief (if any) is replica 0, then the workers
    position = index if kind == "chief" else index + len(payload["cluster"].get("chief", []))
    return len(workers), position
