"""Draw the operator's scale curve from a results file: bench/scale.png.

    bash hack/run-in-venv.sh dev python bench/scale_plot.py RESULTS.json [--out bench/scale.png]

Reads the `scale N: ...` rows that `operator_bench.py --scale` writes (merged or not) and
draws throughput and latency (until every child exists, and until every job's status names its
child), and the operator's peak RSS against the number of jobs created at once, each against its target.
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


NAMED = "throughput until every job's status names its child"


def draw(points: dict[int, dict[str, float]], out: Path, title: str) -> None:
    sizes = list(points)
    fig, (rate, latency, memory) = plt.subplots(1, 3, figsize=(13, 4))
    # The operator's start is done when the job's status names its child; "every child created"
    # alone rewards an operator that writes the statuses after the clock stops.
    if all(NAMED in points[n] for n in sizes):
        rate.plot(sizes, [points[n][NAMED] for n in sizes], "o-", label="until every status names its child")
    rate.plot(sizes, [points[n]["throughput"] for n in sizes], "o--", alpha=0.6, label="until every child exists")
    rate.axhline(100, color="grey", linestyle="--", label="target (1,000 jobs)")
    rate.set(title="throughput", ylabel="jobs/s")
    for q in ("p50", "p99"):
        latency.plot(sizes, [points[n][f"job → child Job {q}"] for n in sizes], "o--", alpha=0.6, label=f"child, {q}")
        named = f"job → its status names the child {q}"
        if all(named in points[n] for n in sizes):
            latency.plot(sizes, [points[n][named] for n in sizes], "o-", label=f"status names it, {q}")
    latency.set(title="job created → child / status", ylabel="s")
    memory.plot(sizes, [points[n]["operator peak RSS"] for n in sizes], "o-", label="peak RSS")
    memory.axhline(150, color="grey", linestyle="--", label="target (1,000 jobs)")
    memory.set(title="operator memory", ylabel="MB")
    for ax in (rate, latency, memory):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.set_xlabel("AutomodelJobs created at once")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
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
