"""Draw the operator's scale curve from a results file: bench/scale.png.

    bash hack/run-in-venv.sh dev python bench/scale_plot.py RESULTS.json [--out bench/scale.png]

Reads the `scale N: ...` rows that `operator_bench.py --scale` writes (merged or not) and
draws throughput, job → child latency (p50, p99) and the operator's peak RSS against the
number of jobs created at once, each against its target.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, no display
import matplotlib.pyplot as plt

ROW = re.compile(r"^scale (?P<size>\d+): (?P<what>.+)$")


def scale_rows(results: dict) -> dict[int, dict[str, float]]:
    """{size: {what: value}} from the results' rows."""
    points: dict[int, dict[str, float]] = {}
    for row in results["rows"]:
        m = ROW.match(row.get("name", ""))
        if m and "value" in row:
            points.setdefault(int(m["size"]), {})[m["what"]] = float(row["value"])
    if not points:
        raise SystemExit("no 'scale N: ...' rows in the file: run operator_bench.py --scale first")
    return dict(sorted(points.items()))


def draw(points: dict[int, dict[str, float]], out: Path, title: str) -> None:
    sizes = list(points)
    fig, (rate, latency, memory) = plt.subplots(1, 3, figsize=(13, 4))
    rate.plot(sizes, [points[n]["throughput"] for n in sizes], "o-", label="kubetune operator")
    rate.axhline(100, color="grey", linestyle="--", label="target (1,000 jobs)")
    rate.set(title="throughput", ylabel="jobs/s")
    for q in ("p50", "p99"):
        latency.plot(sizes, [points[n][f"job → child Job {q}"] for n in sizes], "o-", label=q)
    latency.set(title="job created → child Job created", ylabel="s")
    memory.plot(sizes, [points[n]["operator peak RSS"] for n in sizes], "o-", label="peak RSS")
    memory.axhline(150, color="grey", linestyle="--", label="target (1,000 jobs)")
    memory.set(title="operator memory", ylabel="MB")
    for ax in (rate, latency, memory):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.set_xlabel("AutomodelJobs created at once")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "scale.png")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    machine = results.get("machine", {})
    title = "kubetune operator at scale, kwok nodes" + (f" ({machine['cpu']})" if machine.get("cpu") else "")
    draw(scale_rows(results), args.out, title)
    print(args.out)


if __name__ == "__main__":
    main()
