"""A stand-in for pandas, for TRL's import chain only (see ../datasets/__init__.py for why it
exists): TRL 1.16's trainer modules import pandas at module level and use it only to build the
completion tables of `log_completions` (off in benchmarks/bench_grpo.py). Any use raises."""

__version__ = "0.0.0+trl-stub"


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("the pandas stub has no tables: keep log_completions off")


class DataFrame(_Unavailable):
    pass


class Series(_Unavailable):
    pass


def concat(*args, **kwargs):
    raise NotImplementedError("the pandas stub has no tables: keep log_completions off")
