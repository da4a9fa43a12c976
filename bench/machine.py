"""Facts about the machine a benchmark ran on, stored next to its numbers."""

from __future__ import annotations

import os
import platform
import sys


def machine_facts() -> dict:
    import torch
    import transformers

    from common import cpu_family_model, cpu_flags, cpu_model

    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        # family / model / L2 per core: VMs name every Xeon "Intel(R) Xeon(R) Processor", these tell them apart
        "cpu_family_model": cpu_family_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
