"""Reading a fileset: a directory of `*.jsonl` / `*.parquet` files (sorted) or one file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.common.config import ConfigError

SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ConfigError):
    """The dataset cannot be read or a row has no usable shape; the message names file and row.
    A ConfigError, so the termination log gets its one-line reason without a traceback."""


@dataclass(frozen=True)
class Row:
    """A dataset row with where it came from, for error messages."""

    data: dict[str, Any]
    source: str
    index: int

    @property
    def where(self) -> str:
        return f"{self.source} row {self.index + 1}"


def list_data_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl or .parquet")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: the dataset path does not exist (expected a directory of .jsonl/.parquet files)")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{path}: no .jsonl or .parquet files in the dataset directory")
    return files


def _read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {line_no + 1}: not valid JSON ({exc.msg})") from None
            if not isinstance(data, dict):
                raise DataError(f"{path} line {line_no + 1}: each line must be a JSON object")
            rows.append(Row(data=data, source=str(path), index=len(rows)))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which this trainer image lacks; use JSONL") from None
    table = pq.read_table(path)
    return [Row(data=record, source=str(path), index=i) for i, record in enumerate(table.to_pylist())]


def read_rows(path: str | Path) -> list[Row]:
    """All rows of the fileset at `path`, files in sorted order."""
    rows: list[Row] = []
    for file in list_data_files(Path(path)):
        rows.extend(_read_parquet(file) if file.suffix == ".parquet" else _read_jsonl(file))
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return rows
