"""The machine a speed measurement ran on, as its result files record it: the evaluations'
provenance (:mod:`attnsteer.evals.results`: host, versions, git) plus the device, the CPU model and
``hardware`` (the GPU's name, else the CPU's) that the tables and charts show."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ..evals.results import git_info, library_versions, machine_info


def git_hash() -> str:
    """The commit of the attnsteer source tree, ``+dirty`` when it has changes; ``unknown`` outside git."""
    info = git_info()
    if not info["commit"]:
        return "unknown"
    return info["commit"] + ("+dirty" if info["dirty"] else "")


def cpu_model() -> str:
    import platform

    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe(device) -> dict:
    """Facts of this machine and ``device`` (a torch.device) for the result files."""
    import torch

    host = machine_info()
    versions = library_versions()
    info = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": host["cpu_count"],
        "torch_threads": torch.get_num_threads(),
        "python": versions["python"],
        "platform": host["platform"],
        "torch": torch.__version__,
        "transformers": versions["transformers"],
        "triton": _version("triton"),
        "attnsteer": versions["attnsteer"],
        "cuda": torch.version.cuda,
        "git": git_hash(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
        )
    info["hardware"] = info.get("gpu") or info["cpu_model"]
    return info
