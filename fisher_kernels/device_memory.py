"""How much memory is free on a device (a probe of the machine, no planning)."""

from __future__ import annotations

import os

import torch


def available_memory(device) -> tuple[int, str]:
    """Free bytes on ``device`` and where the figure comes from: ``torch.cuda.mem_get_info`` for
    CUDA devices, the kernel's ``MemAvailable`` (or ``os.sysconf``) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"torch.cuda.mem_get_info({device})"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "os.sysconf(SC_AVPHYS_PAGES)"


def process_memory(field: str = "VmRSS") -> int | None:
    """This process's memory in bytes from ``/proc/self/status`` (``VmRSS``: resident now; ``VmHWM``:
    its peak), or None where there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
