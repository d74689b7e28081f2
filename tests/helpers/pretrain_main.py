"""pretrain.main as far as Megatron's pretrain(): its arguments and model provider, recorded."""

from __future__ import annotations


def pretrain_main_recorded(monkeypatch, argv: list[str]) -> dict:
    """{"cfg", "provider"}: what `megatron_dsv3.pretrain.main(argv)` hands Megatron's
    pretrain(), which is replaced by a recorder; everything main installs in Megatron (its
    save / load / evaluate hooks, the optimizer and dataset helpers) and sys.argv are restored
    after the test."""
    import sys

    import megatron.training
    from megatron.core import optimizer
    from megatron.core.datasets import utils
    from megatron.training import training

    from megatron_dsv3 import pretrain

    seen = {}
    monkeypatch.setattr(megatron.training, "pretrain", lambda cfg, *a, model_provider, **k:
                        seen.update(cfg=cfg, provider=model_provider))
    for module, name in ((training, "save_checkpoint"), (training, "load_checkpoint"),
                         (training, "evaluate"), (optimizer, "Adam"),
                         (optimizer, "USING_PYTORCH_OPTIMIZER"), (utils, "compile_helpers")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    pretrain.main(argv)
    return seen
