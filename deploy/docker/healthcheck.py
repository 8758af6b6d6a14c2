"""The images' HEALTHCHECK: exit 0 when lmserve's readiness route answers 200 on this container's port.

/readyz is 200 once the models are loaded and the engine runs, and 503 while draining; like every probe
route it needs no API key. LMSERVE_PORT is the port the server was told to use (8000 by default).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

READY_PATH = "/readyz"


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('LMSERVE_PORT') or 8000}{READY_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
