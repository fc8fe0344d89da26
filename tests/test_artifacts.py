"""Artifacts: save/load round trips, atomic writes, and refusal of bad artifact directories."""
import json
import os
import pathlib

import pytest
import torch
import transformers

import sparseforge
from sparseforge.errors import UserInputError
from sparseforge.formats.artifact import ARTIFACT_FILE, FORMAT_VERSION
from tiny_models import tiny_model

torch.set_num_threads(1)


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(input_ids=ids).logits


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def strays(path: pathlib.Path) -> list[str]:
    patterns = (f".{path.name}.sparseforge-*", ".probe.sparseforge-*")
    return sorted(str(p) for pattern in patterns for p in path.parent.glob(pattern))


@pytest.fixture
def compressed(tokenizer):
    model, report = sparseforge.compress(tiny_model("llama"), "magnitude-50", tokenizer, progress=False)
    return model


# ------------------------------------------------------------------------------------------ round trip


def test_save_load_round_trip(tmp_path, tokenizer, compressed):
    recipe = sparseforge.load_recipe("magnitude-50")
    target = tmp_path / "artifact"
    returned = sparseforge.save(compressed, target, tokenizer, recipe=recipe, metrics={"sparsity": 0.5})
    assert pathlib.Path(returned) == target
    assert strays(target) == []
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))
    assert not list(target.glob("*.bin"))

    info = json.loads((target / ARTIFACT_FILE).read_text())
    assert info["format_version"] == FORMAT_VERSION == 1
    assert info["versions"] == {"sparseforge": sparseforge.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    assert info["recipe"] == recipe.to_dict()
    assert info["recipe"]["name"] == "magnitude-50"
    assert info["metrics"] == {"sparsity": 0.5}
    assert len(info["stages"]) == 1 and info["stages"][0]["method"] == "magnitude"  # from compress()

    expected = logits(compressed)
    loaded = sparseforge.load(target)
    assert torch.equal(logits(loaded), expected)
    assert loaded.sparseforge_info["recipe"]["name"] == "magnitude-50"
    assert loaded.sparseforge_info["format_version"] == FORMAT_VERSION

    plain = transformers.AutoModelForCausalLM.from_pretrained(target).eval()
    assert torch.equal(logits(plain), expected)

    tok = sparseforge.load_tokenizer(target)
    text = "The quick brown fox jumps over the lazy dog."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]

    # the zeros survive the trip
    for (name, a), (_, b) in zip(compressed.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_save_accepts_recipe_dict_and_refuses_existing_dir(tmp_path, tokenizer):
    model = tiny_model("llama")
    target = tmp_path / "a"
    sparseforge.save(model, target, tokenizer, recipe={"name": "custom", "stages": []})
    assert json.loads((target / ARTIFACT_FILE).read_text())["recipe"]["name"] == "custom"
    before = snapshot(target)
    with pytest.raises(UserInputError, match="already exists"):
        sparseforge.save(model, target, tokenizer)
    assert snapshot(target) == before


# ------------------------------------------------------------------------------------------- atomicity


def failing_save_pretrained(exc):
    def save_pretrained(directory, *args, **kwargs):
        directory = pathlib.Path(directory)
        (directory / "config.json").write_text("{}")  # half-written output, then the failure
        (directory / "model.safetensors").write_bytes(b"\0" * 64)
        raise exc

    return save_pretrained


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_save_leaves_nothing(tmp_path, tokenizer, monkeypatch, exc):
    model = tiny_model("llama")
    monkeypatch.setattr(model, "save_pretrained", failing_save_pretrained(exc))
    target = tmp_path / "artifact"
    with pytest.raises(type(exc)):
        sparseforge.save(model, target, tokenizer)
    assert not target.exists()
    assert strays(target) == []
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_artifact(tmp_path, tokenizer, monkeypatch):
    old_model = tiny_model("llama", seed=1)
    target = tmp_path / "artifact"
    sparseforge.save(old_model, target, tokenizer, recipe={"name": "old", "stages": []})
    before = snapshot(target)

    new_model = tiny_model("llama", seed=2)
    monkeypatch.setattr(new_model, "save_pretrained", failing_save_pretrained(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        sparseforge.save(new_model, target, tokenizer, recipe={"name": "new", "stages": []}, overwrite=True)

    assert snapshot(target) == before
    assert strays(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert torch.equal(logits(sparseforge.load(target)), logits(old_model))


def test_failure_after_weights_keeps_old_artifact(tmp_path, tokenizer, monkeypatch):
    """A failure later in save (writing the tokenizer) is rolled back too."""
    target = tmp_path / "artifact"
    sparseforge.save(tiny_model("llama", seed=1), target, tokenizer)
    before = snapshot(target)

    class BrokenTokenizer:
        def save_pretrained(self, directory, *args, **kwargs):
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        sparseforge.save(tiny_model("llama", seed=2), target, BrokenTokenizer(), overwrite=True)
    assert snapshot(target) == before
    assert strays(target) == []


# -------------------------------------------------------------------------------------- load refusals


def test_load_missing_path(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        sparseforge.load(tmp_path / "nowhere")


def test_load_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserInputError, match="config.json"):
        sparseforge.load(tmp_path)


def test_load_regular_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(UserInputError, match="not a Hugging Face model directory"):
        sparseforge.load(f)


def test_load_refuses_pickled_weights(tmp_path, monkeypatch):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a user path")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(UserInputError, match="safetensors") as info:
        sparseforge.load(tmp_path)
    assert "unpickle" in str(info.value)


@pytest.mark.parametrize("version", [2, 0, "1", None], ids=["future", "zero", "string", "missing"])
def test_load_wrong_format_version(tmp_path, tokenizer, version):
    target = tmp_path / "artifact"
    sparseforge.save(tiny_model("llama"), target, tokenizer)
    info = json.loads((target / ARTIFACT_FILE).read_text())
    if version is None:
        del info["format_version"]
    else:
        info["format_version"] = version
    (target / ARTIFACT_FILE).write_text(json.dumps(info))
    with pytest.raises(UserInputError) as excinfo:
        sparseforge.load(target)
    message = str(excinfo.value)
    assert "format_version" in message and repr(version) in message
    assert "\n" not in message


def test_load_corrupt_artifact_json(tmp_path, tokenizer):
    target = tmp_path / "artifact"
    sparseforge.save(tiny_model("llama"), target, tokenizer)
    (target / ARTIFACT_FILE).write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        sparseforge.load(target)


# ------------------------------------------------------------------------- known bugs (see report)


def test_load_artifact_json_that_is_not_an_object(tmp_path, tokenizer):
    target = tmp_path / "artifact"
    sparseforge.save(tiny_model("llama"), target, tokenizer)
    (target / ARTIFACT_FILE).write_text("[1, 2]\n")
    with pytest.raises(UserInputError):
        sparseforge.load(target)


def test_artifact_directory_mode_follows_umask(tmp_path, tokenizer):
    old = os.umask(0o022)
    try:
        target = tmp_path / "artifact"
        sparseforge.save(tiny_model("llama"), target, tokenizer)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755


# --- compact storage -------------------------------------------------------------------------------

from sparseforge.formats.sparse_storage import pack_bitmask, pack_nm, unpack_bitmask, unpack_nm  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_storage_round_trips_and_sizes(dtype):
    from sparseforge.core.masks import nm_mask, unstructured_mask

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g).to(dtype)
    u = w * unstructured_mask(w.float().abs(), 0.5)
    parts = pack_bitmask(u)
    assert torch.equal(unpack_bitmask(parts, tuple(u.shape)), u)
    nbytes = sum(t.numel() * t.element_size() for t in parts.values())
    assert nbytes == u.numel() // 8 + u.numel() // 2 * u.element_size()
    v = w * nm_mask(w.float().abs(), 2, 4)
    parts = pack_nm(v, 2, 4)
    assert torch.equal(unpack_nm(parts, tuple(v.shape), 2, 4), v)
    nbytes = sum(t.numel() * t.element_size() for t in parts.values())
    assert nbytes == v.numel() // 2 * v.element_size() + v.numel() // 4  # values + 4-bit positions
    e = torch.randn(3, 8, 16, generator=g).to(dtype)
    e = e * nm_mask(e.float().abs(), 1, 4)
    e[0, 0, :4] = 0  # a group with no nonzero at all
    assert torch.equal(unpack_nm(pack_nm(e, 1, 4), tuple(e.shape), 1, 4), e)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
@pytest.mark.parametrize("preset", ["magnitude-50", "magnitude-2of4"])
def test_compact_artifact_reloads_identically(arch, preset, tokenizer, tmp_path):
    from tiny_models import tiny_model

    torch.set_num_threads(1)
    pruned, _ = sparseforge.compress(tiny_model(arch), preset, tokenizer, progress=False)
    sparseforge.save(pruned, tmp_path / "dense", tokenizer)
    sparseforge.save(pruned, tmp_path / "compact", tokenizer, storage="compact")
    info = json.loads((tmp_path / "compact" / "sparseforge.json").read_text())
    formats = {spec["format"] for spec in info["storage"]["tensors"].values()}
    assert formats == ({"nm"} if preset == "magnitude-2of4" else {"bitmask"})
    assert not list((tmp_path / "compact").glob("model*.safetensors"))  # plain transformers cannot mistake it
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert size(tmp_path / "compact") < size(tmp_path / "dense")
    again = sparseforge.load(tmp_path / "compact")
    ids = torch.randint(0, 4000, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, pruned(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plane_coding_round_trips_bit_for_bit(dtype):
    from sparseforge.formats.sparse_storage import decode_planes, encode_planes

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(64, 96, generator=g) * 0.02).to(dtype)
    w[0, :5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-30]).to(dtype)  # odd bit patterns survive
    parts = encode_planes(w)
    back = decode_planes(parts, dtype, tuple(w.shape))
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))
    # Weight-like values use few exponents, so the coded form is smaller than the raw bytes.
    assert sum(p.numel() for p in parts.values()) < 0.95 * w.numel() * w.element_size()
    with pytest.raises(ValueError, match="corrupt"):
        decode_planes({"planes_top": parts["planes_top"], "planes_rest": parts["planes_rest"][:-(w.element_size() - 1)]}, dtype, tuple(w.shape))


@pytest.mark.parametrize("preset", ["magnitude-50", "magnitude-2of4"])
def test_compact_reference_model_is_at_most_065_of_dense(preset, tmp_path):
    """Issue 3's size bar, on the bundled model (whose unpruned embedding is a quarter of its weights)."""
    torch.set_num_threads(1)
    model = sparseforge.load()
    pruned, _ = sparseforge.compress(model, preset, progress=False, inplace=True)
    sparseforge.save(pruned, tmp_path / "dense")
    sparseforge.save(pruned, tmp_path / "compact", storage="compact")
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert size(tmp_path / "compact") <= 0.65 * size(tmp_path / "dense")
    again = sparseforge.load(tmp_path / "compact")
    ids = torch.randint(0, 4000, (1, 32))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, pruned(input_ids=ids).logits)
