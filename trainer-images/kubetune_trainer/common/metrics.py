"""metrics.jsonl (docs/CONTRACT.md section 2): one JSON object per line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; a diverged loss is written as null rather than
    # producing a file that strict readers reject.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends metric records; flushed per line so a killed pod keeps what it logged.

    `resume_step`: when a run resumes from a checkpoint at that step, records of
    later steps (written by the attempt that died after the checkpoint) are
    dropped so the file reads like one uninterrupted run.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._fh: IO[str] | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.read(self.path) if int(line.get("step", 0)) <= resume_step]
            with self.path.open("w", encoding="utf-8") as fh:
                for record in kept:
                    fh.write(json.dumps(record) + "\n")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        records = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
        return records
