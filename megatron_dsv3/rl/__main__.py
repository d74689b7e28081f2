"""`python -m megatron_dsv3.rl`: GRPO post-training (rl/cli.py)."""

from .cli import cli

cli()
