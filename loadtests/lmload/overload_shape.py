"""A load shape that ramps past a server's capacity, holds there, then stops.

Users grow by --overload-step-users every --overload-step-seconds up to --overload-peak-users, hold
for --overload-hold-seconds, and the run ends. Past capacity a server should shed load with 429/503
and Retry-After (recorded as expected) and never answer 5xx, cut a stream short or send a malformed
chunk (failures); the run's exit code is non-zero on any failure.
"""

from __future__ import annotations

import math

from locust import LoadTestShape

from lmload.context import load_context


class OverloadShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        o = load_context(self.runner.environment).settings.overload
        elapsed = self.get_run_time()
        ramp_s = math.ceil(o.peak_users / o.step_users) * o.step_s
        if elapsed < ramp_s:
            users = min(o.peak_users, (int(elapsed // o.step_s) + 1) * o.step_users)
        elif elapsed < ramp_s + o.hold_s:
            users = o.peak_users
        else:
            return None
        return users, float(o.step_users)  # each step's users start within about a second
