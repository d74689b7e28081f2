"""benchmarks/trl_stub/datasets: the in-memory Dataset that stands in for Hugging Face's on the
GPU machine (TRL's GRPOTrainer reads rows by index and columns by name)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

STUB = Path(__file__).resolve().parents[1] / "benchmarks" / "trl_stub" / "datasets" / "__init__.py"


def _stub():
    spec = importlib.util.spec_from_file_location("datasets_stub", STUB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stub_dataset_rows_columns_and_maps():
    datasets = _stub()
    ds = datasets.Dataset.from_dict({"prompt": ["1+2=", "3-1="], "answer": ["3", "2"]})
    assert len(ds) == 2 and ds.column_names == ["prompt", "answer"]
    assert ds[1] == {"prompt": "3-1=", "answer": "2"} and ds["answer"] == ["3", "2"]
    assert ds[0:1] == {"prompt": ["1+2="], "answer": ["3"]} and not ds.cache_files
    assert list(ds.select([1])) == [{"prompt": "3-1=", "answer": "2"}]
    mapped = ds.map(lambda row: {"n": len(row["prompt"])}, remove_columns=["answer"])
    assert list(mapped) == [{"prompt": "1+2=", "n": 4}, {"prompt": "3-1=", "n": 4}]
    assert datasets.Dataset.from_list(list(ds))["prompt"] == ds["prompt"]
