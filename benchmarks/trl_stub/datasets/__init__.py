"""A stand-in for Hugging Face `datasets`, only what TRL's GRPOTrainer touches with an in-memory
list-of-dicts dataset (benchmarks/bench_grpo.py's TRL side on the GPU machine).

Why it exists: the GPU machine has no package registry and a device call carries at most
64 MiB of files. TRL (1.16) imports `datasets` at module level (its trainers type-check their
datasets against `datasets.Dataset` / `IterableDataset`), and the real package drags in
pyarrow (55 MB), pandas, dill, multiprocess, xxhash: more than the call can carry. GRPOTrainer
itself only needs a sized, indexable dataset of prompt rows, so this module gives TRL's import
chain the names it imports and a `Dataset` holding a list of dicts (`from_dict`, `from_list`,
`len`, `[i]`, `[column]`, `column_names`, `cache_files`, `select`, `map` one row at a time);
anything else is missing or raises. Its siblings `pandas` and `pyarrow` stand in the same way
for TRL's other module-level imports.

benchmarks/grpo_gpu.sh puts benchmarks/trl_stub on PYTHONPATH only where no real `datasets`
imports; nothing else imports it (not the package, not the tests).
"""

from __future__ import annotations

__version__ = "0.0.0+trl-stub"


class Dataset:
    """Rows as a list of dicts, all with the same keys."""

    def __init__(self, rows: list[dict]):
        self._rows = [dict(row) for row in rows]

    @classmethod
    def from_dict(cls, mapping: dict, **unused) -> Dataset:
        columns = list(mapping)
        lengths = {len(mapping[c]) for c in columns}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: {sorted(lengths)}")
        count = lengths.pop() if lengths else 0
        return cls([{c: mapping[c][i] for c in columns} for i in range(count)])

    @classmethod
    def from_list(cls, rows: list[dict], **unused) -> Dataset:
        return cls(rows)

    @property
    def column_names(self) -> list[str]:
        return list(self._rows[0]) if self._rows else []

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    features = None  # no typed schema
    cache_files = ()  # in memory (TRL's telemetry asks where the data came from)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self._rows]
        if isinstance(key, slice):
            rows = self._rows[key]
            return {c: [row[c] for row in rows] for c in self.column_names}
        if isinstance(key, int):
            return dict(self._rows[key])
        rows = [self._rows[int(i)] for i in key]
        return {c: [row[c] for row in rows] for c in self.column_names}

    def __iter__(self):
        return (dict(row) for row in self._rows)

    def select(self, indices) -> Dataset:
        return Dataset([self._rows[int(i)] for i in indices])

    def map(self, function, *args, batched: bool = False, remove_columns=None, **unused):
        if batched or args:
            raise NotImplementedError("the datasets stub maps one row at a time only")
        rows = []
        for row in self._rows:
            new = dict(row)
            new.update(function(dict(row)) or {})
            for column in remove_columns or []:
                new.pop(column, None)
            rows.append(new)
        return Dataset(rows)

    def remove_columns(self, columns) -> Dataset:
        columns = [columns] if isinstance(columns, str) else list(columns)
        return Dataset([{k: v for k, v in row.items() if k not in columns} for row in self._rows])

    def __repr__(self) -> str:
        return f"Dataset(stub, columns={self.column_names}, num_rows={len(self)})"


class IterableDataset:
    """Only a type for TRL's isinstance checks: the stub builds none."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("the datasets stub has no IterableDataset")


class DatasetDict(dict):
    """Only a type for TRL's isinstance checks (a dict of splits)."""


class IterableDatasetDict(dict):
    """Only a type for TRL's isinstance checks."""


def load_dataset(*args, **kwargs):
    raise NotImplementedError("the datasets stub loads nothing: build Dataset.from_dict")


def concatenate_datasets(datasets, **unused) -> Dataset:
    return Dataset([row for dataset in datasets for row in dataset])
