"""core.surgery: swapping submodules and parameters by qualified name, at the top level and deep inside."""
import pytest
import torch
from torch import nn

from sparseforge.core.surgery import owner_of, replace_module, replace_parameter
from tiny_models import tiny_model


def test_replace_module_deep_and_at_the_top():
    model = tiny_model("llama")
    old = model.model.layers[1].mlp.down_proj
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    assert replace_module(model, "model.layers.1.mlp.down_proj", new) is old
    assert model.get_submodule("model.layers.1.mlp.down_proj") is new
    assert model.model.layers[0].mlp.down_proj is not new
    head = nn.Linear(64, 4096, bias=False)
    replace_module(model, "lm_head", head)  # no owner path: the root holds it
    assert model.lm_head is head
    with pytest.raises(AttributeError):
        replace_module(model, "model.layers.1.mlp.nothing", new)
    with pytest.raises(ValueError):
        owner_of(model, "model.")


def test_replace_parameter_keeps_everything_else():
    model = tiny_model("llama")
    norm = model.model.layers[0].input_layernorm
    p = nn.Parameter(torch.full_like(norm.weight, 2.0))
    replace_parameter(model, "model.layers.0.input_layernorm.weight", p)
    assert norm.weight is p and dict(model.named_parameters())["model.layers.0.input_layernorm.weight"] is p
    with pytest.raises(AttributeError, match="no parameter 'bias'"):
        replace_parameter(model, "model.layers.0.input_layernorm.bias", p)
