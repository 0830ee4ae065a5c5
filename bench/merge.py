"""Merge the benchmark parts into bench/results/<date>-<machine>.json and print the table.

Standard library only (bench/run.sh runs it with the dev venv's python). Rows are
normalised to the issue's shape: `name`, `value`, `unit`, and where there is a baseline
`baseline` (its value, a number), `baseline_name` (what it is) and `ratio`.

    python bench/merge.py --part operator.json --part trainer.json ... --versions versions.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        gpu = out.stdout.strip() or None
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "gpu": gpu,
        "load_average_at_merge": [float(x) for x in load],
    }


def machine_slug(m: dict[str, Any]) -> str:
    cpu = re.sub(r"[^a-z0-9]+", "-", m["cpu"].lower()).strip("-")
    gpu = "-" + re.sub(r"[^a-z0-9]+", "-", m["gpu"].split(",")[0].lower()).strip("-") if m["gpu"] else ""
    return f"{cpu}-{m['cores']}c{gpu}"


def normalise(row: dict[str, Any]) -> dict[str, Any]:
    """operator_bench.py writes `baseline` as a label and `baseline_value` as the number."""
    out = dict(row)
    if "baseline_value" in out:
        out["baseline_name"] = out.pop("baseline")
        out["baseline"] = out.pop("baseline_value")
    if "baseline" in out and isinstance(out["baseline"], (int, float)) and "ratio" not in out:
        out["ratio"] = round(out["value"] / out["baseline"], 3) if out["baseline"] else None
    return out


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e3 else f"{value:.0f}"
    return "" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("name", "value", "unit", "baseline", "ratio")
    cells = [head] + [tuple(fmt(r.get(k)) for k in head) for r in rows]
    widths = [min(max(len(c[i]) for c in cells), 78 if i == 0 else 20) for i in range(len(head))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(head))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(path: Path) -> str:
    """A results file as a Markdown table (for bench/README.md)."""
    document = json.loads(path.read_text())
    lines = ["| name | value | unit | baseline | ratio |", "|---|---:|---|---:|---:|"]
    for r in document["rows"]:
        cells = [r["name"], fmt(r.get("value")), r.get("unit", ""), fmt(r.get("baseline")), fmt(r.get("ratio"))]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="print this results file as a Markdown table and exit")
    parser.add_argument("--part", type=Path, action="append", default=[], help="a part's JSON ({rows: [...]})")
    parser.add_argument("--versions", type=Path)
    parser.add_argument("--mode", default="full")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    if args.versions is None:
        parser.error("--versions is required (a JSON file of component versions)")
    rows: list[dict[str, Any]] = []
    parts = {}
    runs = {}
    for part in args.part:
        document = json.loads(part.read_text())
        rows += [normalise(r) for r in document["rows"]]
        runs[part.stem] = document.get("runs", 1)
        parts[part.stem] = {k: v for k, v in document.items() if k not in ("rows", "work")}
    m = machine()
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    suffix = "" if args.mode == "full" else f"-{args.mode}"
    out = args.out_dir / f"{today}-{machine_slug(m)}{suffix}.json"
    document = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": args.mode,
        "machine": m,
        "versions": json.loads(args.versions.read_text()),
        "runs": runs,
        "runs_note": "repetitions of each benchmark part (figures are medians over them); within a run, latencies "
        "are percentiles over the jobs, tokens/s the median over the steps after warm-up",
        "parts": parts,
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(table(rows))
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
