"""Rough edges a new user meets in the first hour (issue 9): the default device, errors worded
for the API and for the command line, and the small output details."""

from __future__ import annotations

import pytest
import torch

from reshard.errors import UsageError
from runtime.cli import main as runtime_main


def test_from_pretrained_defaults_to_cuda_if_available_else_cpu(tiny_converted, monkeypatch):
    from runtime import LayeredModel

    with LayeredModel.from_pretrained(tiny_converted["llama"], max_cpu_memory=0) as model:
        assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with LayeredModel.from_pretrained(tiny_converted["llama"], max_cpu_memory=0) as model:
        assert model.device == torch.device("cpu")
        ids = torch.tensor([[3, 4, 5]])
        assert model(ids).logits.shape == (1, 3, 320)


def test_no_gpu_error_is_worded_for_the_api(tiny_converted, monkeypatch):
    from runtime import LayeredModel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError) as e:
        LayeredModel.from_pretrained(tiny_converted["llama"], device="cuda:0")
    assert str(e.value) == ("device 'cuda:0' asked for, but torch sees no CUDA GPU; "
                            "use device=\"cpu\" (or leave device out)")


def test_no_gpu_error_is_worded_for_the_command_line(tiny_converted, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime_main(["generate", str(tiny_converted["llama"]), "--prompt", "w3", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("Error: device 'cuda' asked for, but torch sees no CUDA GPU; "
                                       "use --device cpu (or leave it out)\n")
