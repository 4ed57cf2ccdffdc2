"""The long integrity soak: ``python -m bench.soak [--rounds N] [--clients N]``.

Runs tests/test_soak.py with more rounds and clients (default 400 x 32: about
12,800 checked transfers, several minutes here): random data with SHA-256 checks
through tcp and http services that sleep (pause and stop) and wake all the time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=400, help="connections per client")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    args = parser.parse_args()
    env = {
        **os.environ,
        "WAKEPROXY_SOAK_ROUNDS": str(args.rounds),
        "WAKEPROXY_SOAK_CLIENTS": str(args.clients),
        "WAKEPROXY_SOAK_TIMEOUT": str(max(600, args.rounds * args.clients)),
    }
    argv = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_soak.py")]
    return subprocess.run(argv, env=env, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
