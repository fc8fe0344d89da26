import pytest

from sparseforge.errors import UserInputError
from sparseforge.methods import all_methods, get_method
from sparseforge.recipe import load_recipe, parse_recipe, presets


def test_presets_load_and_round_trip():
    assert {"magnitude-50", "magnitude-2of4", "wanda-50"} <= set(presets())
    for name in presets():
        recipe = load_recipe(name)
        again = parse_recipe(recipe.to_yaml(), "roundtrip.yaml")
        assert again.to_dict() == recipe.to_dict()
    assert load_recipe("magnitude-2of4").stages[0].params.pattern == "2:4"
    assert load_recipe(None).name == "sparsegpt-50"


def test_unquoted_nm_pattern_is_a_string():
    # YAML 1.1 would read 2:4 as the base-60 integer 124
    r = parse_recipe("stages:\n  - method: magnitude\n    params: {pattern: 2:4}\n")
    assert r.stages[0].params.pattern == "2:4"


def test_full_recipe_fields(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: mine\nstages:\n  - method: wanda\n    params: {sparsity: 0.6, compare: row}\n"
        "    targets: ['*.mlp.*']\n    ignore: '*down_proj'\ncalibration: {samples: 4, seq_len: 64, seed: 3}\n"
    )
    r = load_recipe(path)
    assert r.name == "mine" and r.stages[0].targets == ["*.mlp.*"] and r.stages[0].ignore == ["*down_proj"]
    assert r.stages[0].params.sparsity == 0.6
    assert (r.calibration.samples, r.calibration.seq_len, r.calibration.seed) == (4, 64, 3)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("stages: [\n", ["r.yaml:2", "malformed YAML"]),
        ("stages:\n  - method: magnitud\n", ["r.yaml:2", "unknown method 'magnitud'", "magnitude"]),
        ("stages:\n  - method: magnitude\n    parms: {}\n", ["r.yaml:3", "unknown field 'parms'", "params"]),
        ("stages:\n  - method: magnitude\n    params: {sparsity: 1.0}\n", ["r.yaml:3", "sparsity 1.0", "[0, 1)"]),
        ("stages:\n  - method: magnitude\n    params: {sparsity: fifty}\n", ["r.yaml:3", "'sparsity'", "'fifty'", "float"]),
        ("stages:\n  - method: magnitude\n    params: {pattern: 4:4}\n", ["r.yaml:3", "4:4", "N < M"]),
        ("stages:\n  - method: magnitude\n    params: {pattern: 2:4, sparsity: 0.7}\n", ["conflicts"]),
        ("stages:\n  - method: magnitude\n    params: {spars: 0.5}\n", ["unknown parameter 'spars'", "sparsity, pattern, compare"]),
        ("stages:\n  - method: magnitude\n    params: {compare: column}\n", ["'column'", "row, matrix"]),
        ("stages: []\n", ["'stages' is empty"]),
        ("name: x\n", ["no 'stages'"]),
        ("stages:\n  - params: {}\n", ["no 'method'"]),
        ("stages:\n  - method: magnitude\ncalibration: {samples: many}\n", ["r.yaml:3", "samples", "int"]),
        ("stages:\n  - method: magnitude\nextra: 1\n", ["r.yaml:3", "unknown field 'extra'"]),
        ("", ["empty"]),
    ],
)
def test_recipe_errors_name_file_line_field_and_fix(text, expected):
    with pytest.raises(UserInputError) as info:
        parse_recipe(text, "r.yaml")
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_unknown_recipe_path_lists_presets():
    with pytest.raises(UserInputError, match="magnitude-50"):
        load_recipe("no-such-recipe")


def test_registry_is_the_one_place_methods_are_found():
    methods = all_methods()
    assert {"magnitude", "wanda"} <= set(methods)
    for name, cls in methods.items():
        assert get_method(name) is cls and cls.summary and cls.describe()
    with pytest.raises(UserInputError, match="registered methods"):
        get_method("sparsegpt-typo")
