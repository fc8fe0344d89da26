"""The contract every registered method keeps, whatever its family (methods added later are covered as soon as
they register): the stage report's schema; a save -> load round trip, in dense and compact storage, that gives
back the same weights, the same runtime state, the same logits and the same greedy tokens; and for runtime
methods, that detaching leaves the model computing exactly what it computed before the stage was attached.
Each method runs with its `example_params()` on a tiny Llama."""
from __future__ import annotations

import json

import pytest
import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.formats import runtime_state
from sparseforge.methods import all_methods
from sparseforge.recipe import Recipe, Stage
from tiny_models import tiny_model

METHODS = all_methods()
CALIBRATION = dict(samples=2, seq_len=32)  # enough for every statistic, seconds per method



def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _generated(model, ids):
    """Greedy tokens through the model's cache (where cache methods act; a plain forward never fills one)."""
    with torch.no_grad():
        return model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6, do_sample=False, pad_token_id=0)


def _plain_state(model) -> dict:
    with runtime_state.detached(model):
        return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("storage", ["dense", "compact"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, storage, tokenizer, tmp_path):
    cls = METHODS[name]
    params = cls.parse_params(cls.example_params(), f"{name}.example_params()")
    recipe = Recipe(f"contract-{name}", [Stage(name, params)], CalibrationConfig(**CALIBRATION))
    model = tiny_model(getattr(cls, "example_architecture", "llama"))  # MoE methods name a MoE architecture
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    before, before_tokens = _logits(model, ids), _generated(model, ids)

    compressed, report = sparseforge.compress(model, recipe, tokenizer, progress=False)

    # Report schema: family-neutral keys, JSON values.
    (stage,) = report["stages"]
    assert {"method", "family", "lifetime", "seconds"} <= set(stage)
    assert stage["method"].split("+")[0] == name  # OWL says which base ran: "owl+wanda"
    assert (stage["family"], stage["lifetime"]) == (cls.family, cls.lifetime)
    assert cls.lifetime in ("transform", "runtime")
    assert isinstance(stage["seconds"], float) and stage["seconds"] >= 0
    assert json.loads(json.dumps(stage)) == stage
    assert compressed.sparseforge_info["stages"] == report["stages"]
    attached = sparseforge.runtime_stages(compressed)
    assert len(attached) == (cls.lifetime == "runtime")
    assert torch.equal(_logits(model, ids), before)  # compress worked on a copy

    # Save -> load: the same plain weights, the same runtime state, the same logits.
    logits, tokens = _logits(compressed, ids), _generated(compressed, ids)
    sparseforge.save(compressed, tmp_path / "artifact", tokenizer, recipe=recipe, storage=storage)
    loaded = sparseforge.load(tmp_path / "artifact")
    expected, got = _plain_state(compressed), _plain_state(loaded)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    reloaded = sparseforge.runtime_stages(loaded)
    assert [s.stage for s in reloaded] == [s.stage for s in attached]
    for a, b in zip(attached, reloaded):
        assert b.state.data == a.state.data
        assert b.state.tensors.keys() == a.state.tensors.keys()
        assert all(torch.equal(b.state.tensors[k], a.state.tensors[k].cpu()) for k in a.state.tensors)
    assert torch.equal(_logits(loaded, ids), logits)
    assert torch.equal(_generated(loaded, ids), tokens)

    if cls.lifetime == "runtime":
        # Detach gives back the model as it was before attach (here: the uncompressed tiny model), bit for bit;
        # attaching the same stages again gives back the compressed outputs.
        stages = sparseforge.detach_runtime(loaded)
        assert not sparseforge.runtime_stages(loaded)
        assert torch.equal(_logits(loaded, ids), before) and torch.equal(_generated(loaded, ids), before_tokens)
        sparseforge.attach_runtime(loaded, stages)
        assert torch.equal(_logits(loaded, ids), logits) and torch.equal(_generated(loaded, ids), tokens)
        sparseforge.detach_runtime(loaded)
        assert torch.equal(_logits(loaded, ids), before) and torch.equal(_generated(loaded, ids), before_tokens)
