"""Starting or joining Ray, with clear errors instead of hangs.

``connect()`` starts a local Ray instance on loopback when no address is given (the
embedded default); ``connect("HOST:PORT")`` / ``connect("ray://HOST:PORT")`` /
``connect("auto")`` joins an existing cluster. The address is probed over TCP first,
with a time-out: Ray's own client keeps retrying an unreachable address for minutes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from qshift.errors import InputError

MIN_RAY = (2, 9)  # Dataset.map_batches(concurrency=…) and actor restarts as used here


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("scale-out needs Ray: pip install 'ray[data]>=2.9'") from None
    version = tuple(int(x) for x in ray.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_RAY:
        raise InputError(f"Ray {ray.__version__} is too old for qshift.scale (needs >= "
                         f"{'.'.join(map(str, MIN_RAY))}: Dataset.map_batches with an actor pool)")
    return ray


def _probe(address: str, timeout: float) -> None:
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); is `ray start "
                         "--head` running there, and is the port open?") from None


def connect(address: str | None = None, timeout: float = 30.0, num_cpus: int | None = None) -> Any:
    """A running Ray (started locally, or joined at ``address``); returns the ``ray`` module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address == "auto":
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"
        if not current.is_file():
            raise InputError("Ray address 'auto': no running cluster on this machine (start one with "
                             "`ray start --head`, or give no address to start a local instance)")
        address = current.read_text().strip()
    if address:
        _probe(address, min(timeout, 10.0))
    kwargs: dict[str, Any] = {"address": address, "ignore_reinit_error": True, "log_to_driver": False,
                              "include_dashboard": False, "logging_level": "ERROR"}
    if not address:  # the embedded default: a local instance on loopback only
        kwargs.update(num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1")
    else:
        kwargs.pop("include_dashboard")
    try:  # in the calling thread: Ray's start-up needs the main thread's signal handling
        ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any start-up failure, with its address
        raise InputError(f"Ray did not start (address {address or 'local'}): {str(exc)[:300]}") from None
    return ray
