"""`python -m megatron_dsv3.inference generate|chat ...` (inference/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
