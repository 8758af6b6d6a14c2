"""`lmserve` with a failing forward on demand: `python fault_launcher.py TRIGGER serve ...`.

Sets the model runner's test-only `fault_hook` (service/lmserve/engine/runner.py) to raise once the file TRIGGER
exists, then runs the real CLI (lmserve.cli.main) with the remaining arguments, so that the process's
own exit status is what the test reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmserve import cli
from lmserve.engine.runner import ModelRunner
from lmserve.engine.scheduler import SchedulerOutput


def main() -> int:
    trigger = Path(sys.argv[1])

    def fail_once_triggered(_: SchedulerOutput) -> None:
        if trigger.exists():
            raise RuntimeError("injected: the forward failed")

    ModelRunner.fault_hook = staticmethod(fail_once_triggered)  # type: ignore[assignment]
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
