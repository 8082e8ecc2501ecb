"""What a kernel timing depends on besides the layer: the CPU, its vector extensions, its cores
and the runtime's version. Timings measured on one machine are reused only on a machine with
the same signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# The CPU flags that change which int8 and float kernels a runtime picks (VNNI and AMX make int8
# dot products several times faster; AVX-512 widens the float ones).
KERNEL_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm",
)
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def machine_signature() -> dict[str, str | int | list[str]]:
    """The CPU model, its kernel-relevant ISA flags, the usable cores and ONNX Runtime's version."""
    try:
        fields = _cpuinfo_fields(CPUINFO.read_text(errors="replace"))
    except OSError:
        fields = {}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "flags": sorted(flag for flag in KERNEL_FLAGS if flag in flags),
        "cores": usable_cores(),
        "onnxruntime": _package_version("onnxruntime"),
    }


def machine_id() -> str:
    """A short stable digest of `machine_signature()`."""
    text = json.dumps(machine_signature(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
