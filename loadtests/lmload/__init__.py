"""Pieces of lmserve's Locust scenarios and sweep, each with one job.

The pure modules (prompts, sse, outcome, entries, records, charts) do not import Locust, so tests and
other tools can use them without gevent's monkey-patching; http_users, grpc_user, aggregate,
overload_shape and sweep_user do.
"""
