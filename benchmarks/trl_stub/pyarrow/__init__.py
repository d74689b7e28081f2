"""A stand-in for pyarrow, for TRL's import chain only (see ../datasets/__init__.py for why it
exists): TRL 1.16's data_utils imports pyarrow, pyarrow.compute and pyarrow.types at module
level for sequence packing (SFT), which GRPO never calls. Any name resolves to a placeholder
(so annotations such as `pa.Table` evaluate); using one raises."""

__version__ = "0.0.0+trl-stub"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _placeholder(f"pyarrow.{name}")


def _placeholder(qualified: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"{qualified}: the pyarrow stub (benchmarks/trl_stub) has no "
                                  "arrow tables; TRL's GRPO path does not use them")

    return type(qualified.rsplit(".", 1)[-1], (), {"__new__": unavailable,
                                                   "__qualname__": qualified})
