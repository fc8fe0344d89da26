"""The bundled MoE reference model (issue 15): a Mixtral with fused experts that plain transformers and sparseforge
load, reachable by its short name, with a card whose parameter counts match its weights; and the upcycling that
built it, checked exactly on a tiny dense model."""
import json
import pathlib
import sys

import pytest
import torch

from sparseforge.formats.artifact import REFERENCE_MODEL_DIR, REFERENCE_MOE_DIR, resolve_model_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moe():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(REFERENCE_MOE_DIR, dtype=torch.float32).eval()


def test_plain_transformers_builds_a_mixtral_with_fused_experts(moe):
    from transformers import MixtralForCausalLM

    config = moe.config
    assert type(moe) is MixtralForCausalLM and config.model_type == "mixtral"
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    E, I, H = config.num_local_experts, config.intermediate_size, config.hidden_size
    for layer in moe.model.layers:
        assert tuple(layer.mlp.experts.gate_up_proj.shape) == (E, 2 * I, H)
        assert tuple(layer.mlp.experts.down_proj.shape) == (E, H, I)
        assert tuple(layer.mlp.gate.weight.shape) == (E, H)
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()  # tied, as in the dense model
    assert config.max_position_embeddings == 2048 and config.vocab_size == 4096


def test_bundle_files_size_and_tokenizer():
    names = {p.name for p in REFERENCE_MOE_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "training_info.json", "model_card.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in REFERENCE_MOE_DIR.rglob("*") if p.is_file()) <= 30 * 2**20
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the dense model's tokenizer, byte for byte
        assert (REFERENCE_MOE_DIR / f).read_bytes() == (REFERENCE_MODEL_DIR / f).read_bytes()
    from safetensors import safe_open

    with safe_open(REFERENCE_MOE_DIR / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_card_parameter_counts_match_the_weights(moe):
    card = json.loads((REFERENCE_MOE_DIR / "model_card.json").read_text())
    total = sum(p.numel() for p in moe.parameters())
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    counts = card["parameters"]
    assert counts["total"] == total and counts["experts_total"] == experts
    assert counts["active_per_token"] == total - experts * 6 // 8  # top-2 of 8: a quarter of the expert weights
    assert card["training"]["parameters"]["total"] == total
    readme = (REFERENCE_MOE_DIR / "README.md").read_text()
    assert f"{total:,}" in readme and f"{card['perplexity']:.2f}" in readme
    shares = torch.tensor(card["expert_load"]["share"])
    assert shares.shape == (moe.config.num_hidden_layers, 8) and torch.allclose(shares.sum(1), torch.ones(4, dtype=shares.dtype), atol=1e-3)


def test_short_name_resolves_and_a_local_directory_wins(tmp_path, monkeypatch):
    assert resolve_model_path("reference-moe") == str(REFERENCE_MOE_DIR)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference-moe").mkdir()
    (tmp_path / "reference-moe" / "config.json").write_text("{}")
    assert resolve_model_path("reference-moe") == "reference-moe"


def test_sparseforge_load_and_cli_generate_agree_with_transformers(moe, capsys):
    import sparseforge
    from sparseforge.cli import main

    model = sparseforge.load("reference-moe")
    assert type(model) is type(moe)
    for (name, a), (_, b) in zip(model.state_dict().items(), moe.state_dict().items()):
        assert torch.equal(a, b), name
    tokenizer = sparseforge.load_tokenizer("reference-moe")
    prompt = "KING HENRY.\nOnce more unto the"
    ids = tokenizer(prompt, return_tensors="pt")
    out = moe.generate(**ids, max_new_tokens=8, do_sample=False)
    # Greedy decoding with the cache must pick what a full forward pass picks at every step.
    logits = moe(input_ids=out[:, :-1]).logits[0, ids["input_ids"].shape[1] - 1 :]
    assert logits.argmax(-1).tolist() == out[0, ids["input_ids"].shape[1] :].tolist()
    capsys.readouterr()
    assert main(["--quiet", "generate", "--model", "reference-moe", "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :]) in capsys.readouterr().out


def test_upcycling_reproduces_the_dense_mlp_exactly_when_every_expert_is_used():
    """With no noise, a zero router and all experts chosen (uniform weights), the experts' slices sum back to the
    dense MLP when the down projections are scaled by the number of slices: this pins the fused layout (gate rows
    before up rows in gate_up_proj, down_proj columns) and the exact copy of everything else."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "training"))
    from train_moe_reference import count_parameters, upcycle

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True)).eval()
    moe, origin, _ = upcycle(dense, experts=8, top_k=8, expert_width=12, noise=0.0, router_std=0.0, down_scale=4.0,
                             aux_coef=0.01, seed=0)
    moe.eval()
    assert origin == [0, 1, 2, 3, 0, 1, 2, 3]
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.allclose(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)
    assert count_parameters(moe.config)["total"] == sum(p.numel() for p in moe.parameters())
    # Top-2 of the same experts uses a quarter of them per token, so it is no longer the dense function.
    moe2, _, _ = upcycle(dense, 8, 2, 12, 0.0, 0.02, 4.0, 0.01, 0)
    with torch.no_grad():
        assert not torch.allclose(moe2.eval()(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-3)
    with pytest.raises(SystemExit, match="must divide"):
        upcycle(dense, 8, 2, 20, 0.0, 0.0, 1.0, 0.01, 0)
