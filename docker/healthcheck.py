"""The image's HEALTHCHECK: exit 0 when ``barkgpt serve`` answers ``GET /health`` with 200.

It reads the server's command line from ``/proc/1/cmdline`` (the container's first process; with
``docker run --init``, the init's command line, which holds the server's), so a ``--port`` given
there is the one it checks, and a container running another verb (``train``, ``sample``) counts
as healthy. Exit 1 otherwise:
the server is still loading the model (503), it failed, or the port does not answer.
"""

import sys
import urllib.request
from pathlib import Path


def serve_port(argv: list[str]) -> int | None:
    """The port ``barkgpt serve`` listens on in ``argv`` (8000 unless ``--port`` says otherwise);
    None when ``argv`` is not a ``serve`` command."""
    if "serve" not in argv:
        return None
    port = 8000
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = int(argv[i + 1])
        elif arg.startswith("--port="):
            port = int(arg.split("=", 1)[1])
    return port


def main() -> int:
    """Check the server's ``/health``; the exit status Docker reads (0 healthy, 1 not)."""
    argv = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    port = serve_port(argv)
    if port is None:
        return 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:  # HTTPError (503 while loading), connection refused, timeout
        print(f"GET /health on port {port}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
