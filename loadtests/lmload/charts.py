"""The sweep's chart: one PNG, four panels against concurrency, one colour per server.

Panels: output tokens/s; TTFT p50/p90/p99; TPOT p50/p90/p99; goodput (requests/s meeting the SLOs).
Percentiles are told apart by line style (p50 solid, p90 dashed, p99 dotted). Works from the sweep's
JSON (plain dicts), so a saved run can be drawn again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display here
import matplotlib.pyplot as plt  # noqa: E402

_STYLES = {"p50": "-", "p90": "--", "p99": ":"}


def _slo_text(slo: dict[str, Any]) -> str:
    parts = [f"TTFT <= {slo['ttft_ms']:g} ms" if slo.get("ttft_ms") is not None else "",
             f"TPOT <= {slo['tpot_ms']:g} ms" if slo.get("tpot_ms") is not None else ""]
    return " and ".join(p for p in parts if p) or "no SLO"


def plot_sweep(run: dict[str, Any], path: Path) -> None:
    servers = run["servers"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    (ax_tput, ax_good), (ax_ttft, ax_tpot) = axes
    concurrencies = sorted({p["concurrency"] for s in servers for p in s["points"]})
    for i, server in enumerate(servers):
        color = f"C{i}"
        points = sorted(server["points"], key=lambda p: p["concurrency"])
        xs = [p["concurrency"] for p in points]
        ax_tput.plot(xs, [p["output_tok_s"] for p in points], "o-", color=color, label=server["name"])
        ax_good.plot(xs, [p["goodput_req_s"] for p in points], "o-", color=color, label=server["name"])
        for metric, ax in (("ttft_ms", ax_ttft), ("tpot_ms", ax_tpot)):
            for pct, style in _STYLES.items():
                ax.plot(xs, [p[metric][pct] for p in points], style, marker="o", markersize=3, color=color,
                        label=f"{server['name']} {pct}")
    settings = run["settings"]
    titles = {
        ax_tput: "Output tokens/s",
        ax_good: f"Goodput, requests/s ({_slo_text(settings['slo'])})",
        ax_ttft: "Time to first token (ms), p50 / p90 / p99",
        ax_tpot: "Time per output token (ms), p50 / p90 / p99",
    }
    for ax, title in titles.items():
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{run.get('title') or 'Sweep'}: {settings['input_len']}-token prompts, {settings['output_len']} output "
        f"tokens (ignore_eos); {run['generated_utc']}, commit {run.get('commit') or '?'}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
