"""Code run in child processes by tests/test_library.py (spawned, so it must be importable).

Children only read prepared adapter files: importing diffusers and loading a pipeline in each
child would cost seconds per process on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import os
import time


def _renamed(path, name):
    from spectral_diffusion.formats.adapter_file import read_adapter

    data = read_adapter(path)
    info = dataclasses.replace(data.info, name=name, tokens=[f"<{name}>"])
    return dataclasses.replace(data, info=info)


def reserve_and_add(root, name, files_by_slot, rank, capacity, barrier, results, hold_s=0.3):
    """Reserve a slot, 'train' (hold it a while), then add the concept trained for that slot."""
    from spectral_diffusion.formats.adapter_file import read_adapter
    from spectral_diffusion.library.store import Library

    fingerprint = read_adapter(files_by_slot[0]).base_fingerprint
    library = Library(root)
    barrier.wait()  # all children allocate at the same moment
    try:
        with library.reserve(name, fingerprint, rank, capacity, tokens=[f"<{name}>"]) as slot:
            time.sleep(hold_s)  # training: the slot must stay taken for everybody else
            library.add(_renamed(files_by_slot[slot], name))
        results.put((name, slot))
    except Exception as error:  # reported to the parent, which fails the test with it
        results.put((name, f"{type(error).__name__}: {error}"))


def killed_during_add(root, name, adapter_path, rank, capacity):
    """Reserve, start writing the concept, and die mid-write like a killed training (no cleanup)."""
    import spectral_diffusion.library.records as records_module
    import spectral_diffusion.library.store as library_module

    data = _renamed(adapter_path, name)
    library = library_module.Library(root)

    def half_written_save(_data, path):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 1000)
        os._exit(9)  # SIGKILL-like: no finally block, no context-manager exit runs

    records_module.save_adapter = half_written_save
    with library.reserve(name, data.base_fingerprint, rank, capacity):
        library.add(data)
