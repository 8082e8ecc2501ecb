"""Ray, as `iropt batch` and `iropt tune` use it: imported lazily, connected on demand.

Ray is an optional extra (`iropt[distributed]`); without it these commands stop with a message
that says how to install it (a UserError: exit code 2), and nothing else in iropt needs it.

`connect` starts a local Ray instance when no cluster is named (nothing to set up), or joins
the one named by `--address` / `RAY_ADDRESS`, and says on exit whether it should shut Ray
down: only what it started (or joined) itself, never a connection the caller already had.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from iropt.errors import UserError

INSTALL_HINT = "pip install 'iropt[distributed]'"


def import_ray(command: str) -> Any:
    """The `ray` module, or a UserError naming the extra that provides it."""
    try:
        import ray
    except ImportError as error:
        raise UserError(
            f"iropt {command} runs on Ray, which is not installed; install it with: {INSTALL_HINT}"
        ) from error
    return ray


def cluster_address(address: str | None) -> str | None:
    """`--address`, else RAY_ADDRESS, else None (start a local instance)."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def connect(command: str, *, address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, initialized for the duration of the block.

    With no address, a new local instance on 127.0.0.1 (`address="local"`: never a cluster that
    something else on the machine started) with `num_cpus` CPUs (default: all of them).
    """
    ray = import_ray(command)
    if ray.is_initialized():
        yield ray
        return
    target = cluster_address(address)
    # A command-line run sends no usage statistics unless the user opted in through the variable.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if target is None:
        options.update(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1")
    else:
        options["address"] = target
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as error:
        where = target or "a local instance"
        raise UserError(f"iropt {command}: cannot start or reach Ray ({where}): {error}") from error
    try:
        yield ray
    finally:
        ray.shutdown()


def largest_node_memory(ray: Any) -> int | None:
    """The most `memory` resource one live node offers (bytes), or None when none says."""
    sizes = [
        int(node.get("Resources", {}).get("memory", 0))
        for node in ray.nodes()
        if node.get("Alive")
    ]
    best = max(sizes, default=0)
    return best or None
