"""`python -m megatron_dsv3.train` (and `torchrun ... -m megatron_dsv3.train`)."""

from . import main

if __name__ == "__main__":
    main()
