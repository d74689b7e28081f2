"""`python -m megatron_dsv3.train` (and `torchrun ... -m megatron_dsv3.train`)."""

from . import cli

if __name__ == "__main__":
    cli()
