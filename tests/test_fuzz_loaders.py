"""Fuzzing the readers of user-given files (issue 9): safetensors weights, sparseforge.json, recipes and compact
artifacts, fed truncated, bit-flipped and random inputs. Every input must end in success or a one-line
UserInputError: no other exception, no hang. Hypothesis runs a bounded, derandomized number of cases so CI
sees the same inputs every time: 1050 cases, about 20 s in all on a 2-core CPU)."""
import pathlib
import shutil
import signal
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseforge.errors import UserInputError

torch.set_num_threads(1)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
SECONDS_PER_CASE = 20  # a case taking longer than this counts as a hang


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def ends_cleanly(fn, *args):
    """Run fn; pass on success or a one-line UserInputError; fail on anything else or a hang."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CASE)
    try:
        return fn(*args)
    except UserInputError as exc:
        assert "\n" not in str(exc), str(exc)
        assert str(exc).strip()
    except _Hang:
        pytest.fail(f"{fn.__name__} hung for {SECONDS_PER_CASE} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# Mutations: truncate at a position, flip bits at positions, replace a slice with random bytes, or all random.
mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8)),
    st.tuples(st.just("splice"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("random"), st.binary(max_size=4096)),
)


def mutate(data: bytes, how) -> bytes:
    kind = how[0]
    if kind == "truncate":
        return data[: int(len(data) * how[1])]
    if kind == "flip":
        out = bytearray(data)
        for where, bit in how[1]:
            i = min(int(where * len(out)), len(out) - 1)
            out[i] ^= 1 << bit
        return bytes(out)
    if kind == "splice":
        i = int(how[1] * len(data))
        return data[:i] + how[2] + data[i + len(how[2]):]
    return how[1]


@pytest.fixture(scope="module")
def safetensors_bytes():
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        f = pathlib.Path(tmp) / "w.safetensors"
        save_file({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
                   "c": torch.zeros(2, dtype=torch.int64)}, str(f), metadata={"format": "pt"})
        return f.read_bytes()


@FUZZ
@given(how=mutation)
def test_safetensors_check_then_load(tmp_path, safetensors_bytes, how):
    """If our header check accepts a file, the safetensors library must load it without an error."""
    from safetensors.torch import load_file

    from sparseforge.formats.safetensors_check import check_safetensors

    f = tmp_path / "fuzzed.safetensors"
    f.write_bytes(mutate(safetensors_bytes, how))

    def check_and_load(path):
        check_safetensors(path)
        load_file(str(path))  # must not raise once the check passed

    ends_cleanly(check_and_load, f)


@pytest.fixture(scope="module")
def artifact_json(tmp_path_factory, tokenizer):
    import sparseforge
    from tiny_models import tiny_model

    out = tmp_path_factory.mktemp("art") / "a"
    model, _ = sparseforge.compress(tiny_model("llama"), "magnitude-50", tokenizer, progress=False)
    sparseforge.save(model, out, tokenizer)
    return (out / "sparseforge.json").read_bytes()


@FUZZ
@given(how=mutation)
def test_sparseforge_json_reader(tmp_path, artifact_json, how):
    from sparseforge.formats.artifact import read_artifact_info

    f = tmp_path / "sparseforge.json"
    f.write_bytes(mutate(artifact_json, how))
    info = ends_cleanly(read_artifact_info, f)
    assert info is None or isinstance(info, dict)


RECIPE = (b"name: fuzz\nstages:\n  - method: sparsegpt\n    params: {sparsity: 0.5, pattern: '2:4'}\n    targets: ['*.mlp.*']\n"
          b"    ignore: ['*.layers.0.*']\ncalibration: {samples: 4, seq_len: 64, seed: 1, propagate: dense}\n")


@FUZZ
@given(how=mutation)
def test_recipe_parser(how):
    from sparseforge.recipe import parse_recipe

    text = mutate(RECIPE, how).decode("utf-8", errors="replace")
    ends_cleanly(parse_recipe, text, "fuzz.yaml")


@pytest.fixture(scope="module")
def compact_artifact(tmp_path_factory, tokenizer):
    import sparseforge
    from tiny_models import tiny_model

    out = tmp_path_factory.mktemp("compact") / "c"
    model, _ = sparseforge.compress(tiny_model("llama"), "magnitude-2of4", tokenizer, progress=False)
    sparseforge.save(model, out, tokenizer, storage="compact")
    return out


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["sparseforge-weights.safetensors", "sparseforge.json", "config.json"]), how=mutation)
def test_compact_artifact_loader(tmp_path, compact_artifact, target, how):
    from sparseforge.formats.artifact import load_model

    art = tmp_path / "c"
    if art.exists():
        shutil.rmtree(art)
    shutil.copytree(compact_artifact, art)
    f = art / target
    f.write_bytes(mutate(f.read_bytes(), how))
    ends_cleanly(load_model, art)


def test_fuzz_mutations_reach_the_error_paths(safetensors_bytes, tmp_path):
    """The fuzzer is only worth its time if its inputs are mostly refused: check a few by hand."""
    from sparseforge.formats.safetensors_check import check_safetensors

    cases = [("truncate", 0.5), ("random", b"\x00" * 16), ("flip", [(0.0, 7)]), ("splice", 0.01, b"\xff" * 8)]
    for how in cases:
        f = tmp_path / "x.safetensors"
        f.write_bytes(mutate(safetensors_bytes, how))
        with pytest.raises(UserInputError, match="not a valid safetensors file"):
            check_safetensors(f)


def test_recipe_with_an_empty_stages_value_is_one_line():
    """Found by the fuzzer: `stages:` with nothing after it made the error message itself crash in PyYAML."""
    from sparseforge.recipe import parse_recipe

    with pytest.raises(UserInputError, match=r"fuzz.yaml:2: 'stages' must be a list, got None"):
        parse_recipe("name: fuzz\nstages:\n", "fuzz.yaml")
