"""Read every file of a folder with ``read_adapter`` under a hard address-space limit; print a JSON summary.

    python tests/fuzz_worker.py FOLDER [HEADROOM_MB]

Run by tests/test_fuzz_adapter.py in a child process. After the imports and one warm-up read, the
address space is capped at its current size plus HEADROOM_MB (``RLIMIT_AS``): a read that tried to
allocate what a hostile header declares would fail with MemoryError / RuntimeError, which is reported
as an unexpected outcome. Also reports the peak resident memory growth and the slowest read.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def main() -> int:
    folder = Path(sys.argv[1])
    headroom_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    import torch

    torch.set_num_threads(1)
    from spectral_diffusion.errors import AdapterFormatError
    from spectral_diffusion.formats.adapter_file import read_adapter

    files = sorted(p for p in folder.iterdir() if p.is_file())
    warm = folder / "valid.safetensors"
    read_adapter(warm)  # warm up: first-call allocations of torch and safetensors
    limit = _vm_kb("VmSize") * 1024 + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:  # the canary: an allocation beyond the headroom must fail now, or the cap proves nothing
        torch.empty(headroom_mb * 2**20 * 2, dtype=torch.uint8).fill_(1)
        cap_enforced = False
    except (MemoryError, RuntimeError):
        cap_enforced = True
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes: dict[str, str] = {}
    slowest = 0.0
    for path in files:
        started = time.perf_counter()
        try:
            read_adapter(path)
            outcomes[path.name] = "accepted"
        except AdapterFormatError:
            outcomes[path.name] = "AdapterFormatError"
        except BaseException as error:  # noqa: BLE001 - everything else is what we look for
            outcomes[path.name] = f"UNEXPECTED {type(error).__name__}: {str(error)[:200]}"
        slowest = max(slowest, time.perf_counter() - started)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "outcomes": outcomes,
                "peak_rss_growth_mb": (rss_after - rss_before) / 1024,
                "slowest_s": slowest,
                "headroom_mb": headroom_mb,
                "cap_enforced": cap_enforced,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
