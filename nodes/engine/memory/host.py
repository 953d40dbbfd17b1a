"""The host's RAM: what planning bounds the page-locked copies by, and what a Mac's unified
memory is (`device_facts`)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HostMemory:
    available: int     # MemAvailable: what can be allocated without swapping
    total: int


def host_memory() -> HostMemory | None:
    """The host's RAM figures (torch has no API for them): psutil's, on every OS (Windows has neither
    /proc/meminfo nor sysconf; ComfyUI ships psutil); without psutil, Linux's /proc/meminfo, else
    sysconf; None where nothing answers (then pinning is not bounded by a figure we do not have)."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        try:
            vm = psutil.virtual_memory()
            return HostMemory(int(vm.available), int(vm.total))
        except (OSError, RuntimeError, AttributeError):
            pass
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        return HostMemory(fields["MemAvailable"], fields["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return HostMemory(os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page)
    except (AttributeError, ValueError, OSError):
        return None
