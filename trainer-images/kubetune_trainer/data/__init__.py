"""Dataset reading, row formatting, held-out split and packing (torch-free), shared by both trainers."""

from kubetune_trainer.data.files import DataError, Row, list_data_files, read_rows
from kubetune_trainer.data.formatting import (
    IGNORE_INDEX,
    FormatOptions,
    FormatReport,
    TokenizedExample,
    format_row,
    template_fields,
    tokenize_rows,
)
from kubetune_trainer.data.packing import PackedExample, PackingReport, pack_examples
from kubetune_trainer.data.split import holdout_split

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "FormatOptions",
    "FormatReport",
    "PackedExample",
    "PackingReport",
    "Row",
    "TokenizedExample",
    "format_row",
    "holdout_split",
    "list_data_files",
    "pack_examples",
    "read_rows",
    "template_fields",
    "tokenize_rows",
]
