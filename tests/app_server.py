"""Run the web app (``webapp``, what app.py runs) in its own process for the load and security tests
(tests/test_load.py, tests/test_security.py): its memory can then be measured alone, and it binds where
``webapp.main.launch`` binds by default (no host is passed).

    python tests/app_server.py --library DIR --outputs DIR --port N [--auth USER:PASSWORD]

It uses the app's own ``build_app`` and ``launch`` (the same queue, upload limit and file-serving rules
as ``python app.py``); only the training defaults differ, so a test training takes seconds:
a one-step final preview at 32 px. Prints ``READY <url>`` once it serves, then runs until killed.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # the test machine is shared; one request at a time is computed anyway
    from spectral_diffusion.frontends.service import Service
    from webapp.main import build_app, launch

    service = Service(
        model="builtin:tiny",
        library=args.library,
        output_dir=args.outputs,
        train_defaults={"preview_steps": 1, "resolution": 32},
    )
    demo = build_app(service)
    launch(demo, port=args.port, auth=args.auth, prevent_thread_lock=True, quiet=True)
    print(f"READY {demo.local_url}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
