"""megatron_cli.megatron_flags: each preset written as Megatron-LM flags, parsed by Megatron's
own argument parser and turned into its TransformerConfig, comes back through
`from_megatron_config` as the preset in every field Megatron's arguments carry."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from megatron_dsv3.config import PRESETS, preset
from megatron_dsv3.megatron_cli import main, megatron_flags


def _through_megatrons_parser(flags: list[str]):
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.training.arguments import (add_megatron_arguments,
                                             core_transformer_config_from_args)

    args = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(flags)
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float32  # validate_args' job
    return core_transformer_config_from_args(args, MLATransformerConfig)


def _not_carried(cfg, back):
    """`cfg` with what Megatron's arguments do not carry as from_megatron_config fills it (a
    model without MTP layers: the MTP weight is Megatron's default, which weighs nothing)."""
    mtp = (dataclasses.replace(cfg.mtp, loss_weight_schedule=((0, cfg.mtp.loss_weight(0)),))
           if cfg.mtp.num_layers else dataclasses.replace(back.mtp, num_layers=0))
    moe = dataclasses.replace(cfg.moe, bias_update_stop_tokens=None)
    return dataclasses.replace(cfg, name="from-megatron", mtp=mtp, moe=moe)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_comes_back_from_megatrons_parser(name):
    from megatron_dsv3.config import from_megatron_config

    cfg = preset(name)
    transformer = _through_megatrons_parser(megatron_flags(cfg))
    back = from_megatron_config(transformer, vocab_size=cfg.vocab_size,
                                max_seq_len=cfg.max_seq_len)
    assert back == _not_carried(cfg, back)


def test_the_command_prints_the_flags_shell_quoted(capsys):
    import shlex

    main(["v3-671b"])
    printed = shlex.split(capsys.readouterr().out)
    assert printed == megatron_flags(preset("v3-671b"))
    assert "--rope-type" in printed and printed[printed.index("--rope-type") + 1] == "yarn"


def test_yarn_settings_megatron_has_no_flag_for_are_refused():
    from megatron_dsv3.config import ConfigError

    cfg = preset("v3-671b")
    odd = dataclasses.replace(cfg, mla=dataclasses.replace(
        cfg.mla, yarn=dataclasses.replace(cfg.mla.yarn, beta_fast=16.0)))
    with pytest.raises(ConfigError, match="beta_fast=16.0 cannot be given to Megatron-LM"):
        megatron_flags(odd)
