"""Recipes: an ordered list of stages (method, params, target and ignore globs) plus calibration settings,
read from YAML with errors that name the file, the line, the field, the bad value and what is allowed.
Stages of both lifetimes share one list: transforms (weight methods) first, then runtime stages."""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import yaml

from sparseforge.core.calibration import CalibrationConfig
from sparseforge.errors import UserInputError
from sparseforge.methods.base import get_method

PRESET_DIR = pathlib.Path(__file__).resolve().parent / "recipes"
DEFAULT_PRESET = "sparsegpt-50"  # best measured at 50% (benchmarks/results/weight_quality.md)
_STAGE_FIELDS = ("method", "params", "targets", "ignore")
_RECIPE_FIELDS = ("name", "stages", "calibration")
_CALIBRATION_FIELDS = tuple(f.name for f in dataclasses.fields(CalibrationConfig))


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 integers, so `pattern: 2:4` stays the string '2:4' (not 124)."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:int"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


@dataclasses.dataclass
class Stage:
    method: str
    params: Any  # the method's Params dataclass
    targets: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    ignore: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "params": dataclasses.asdict(self.params), "targets": self.targets, "ignore": self.ignore}


@dataclasses.dataclass
class Recipe:
    name: str
    stages: list[Stage]
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    source: str = ""  # file path or "preset:NAME"

    def to_dict(self) -> dict:
        cal = dataclasses.asdict(self.calibration)
        cal.pop("device")
        return {"name": self.name, "stages": [s.to_dict() for s in self.stages], "calibration": cal}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def presets() -> dict[str, pathlib.Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_recipe(spec: str | pathlib.Path | None) -> Recipe:
    """A recipe from a YAML path or a preset name (None: the default preset)."""
    spec = DEFAULT_PRESET if spec is None else str(spec)
    known = presets()
    if spec in known:
        return parse_recipe(known[spec].read_text(), f"preset:{spec}")
    path = pathlib.Path(spec)
    if not path.is_file():
        raise UserInputError(f"recipe '{spec}' is neither a YAML file nor a preset; presets: {', '.join(known)}")
    return parse_recipe(path.read_text(encoding="utf-8"), str(path))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(f"{where}: malformed YAML ({problem}); fix the syntax at that line") from None
    if root is None:
        raise UserInputError(f"{source}: the recipe is empty; it needs a 'stages' list")
    doc = _Node(root, source)
    doc.expect_mapping("the recipe")
    doc.check_fields(_RECIPE_FIELDS)
    stages_node = doc.get("stages")
    if stages_node is None:
        raise UserInputError(f"{doc.where()}: the recipe has no 'stages' list; add at least one stage with a 'method'")
    stages_node.expect_sequence("'stages'")
    if not stages_node.items():
        raise UserInputError(f"{stages_node.where()}: 'stages' is empty; add at least one stage with a 'method'")
    stages = [_parse_stage(s, i) for i, s in enumerate(stages_node.items())]
    try:
        check_stage_order(stages)
    except UserInputError as exc:
        raise UserInputError(f"{stages_node.where()}: {exc}") from None
    name_node = doc.get("name")
    name = str(name_node.value()) if name_node is not None else pathlib.Path(source).stem
    calibration = CalibrationConfig()
    cal_node = doc.get("calibration")
    if cal_node is not None:
        cal_node.expect_mapping("'calibration'")
        cal_node.check_fields(_CALIBRATION_FIELDS)
        for key, value_node in cal_node.mapping().items():
            default = getattr(calibration, key)
            value = value_node.value()
            if default is not None and type(value) is not type(default):
                raise UserInputError(
                    f"{value_node.where()}: calibration '{key}' got {value!r}; expected {type(default).__name__}"
                )
            setattr(calibration, key, value)
        try:
            calibration.validate()
        except UserInputError as exc:
            raise UserInputError(f"{cal_node.where()}: {exc}") from None
    return Recipe(name, stages, calibration, source)


def check_stage_order(stages: list[Stage]) -> None:
    """Transforms first, then runtime stages: a runtime stage is calibrated on the weights the transforms before
    it produced, and a later transform would change them under it (or, like structured pruning, replace the
    very modules it hooked)."""
    first_runtime = None
    for i, stage in enumerate(stages, 1):
        lifetime = get_method(stage.method).lifetime
        if lifetime == "runtime" and first_runtime is None:
            first_runtime = (i, stage.method)
        elif lifetime == "transform" and first_runtime is not None:
            raise UserInputError(f"stage {i} ({stage.method}) changes weights after runtime stage {first_runtime[0]} ({first_runtime[1]}); "
                                 "list runtime stages after every transform")


def _parse_stage(node: "_Node", index: int) -> Stage:
    node.expect_mapping(f"stage {index + 1}")
    node.check_fields(_STAGE_FIELDS)
    method_node = node.get("method")
    if method_node is None:
        raise UserInputError(f"{node.where()}: stage {index + 1} has no 'method'; see `sparseforge methods`")
    try:
        cls = get_method(str(method_node.value()))
    except UserInputError as exc:
        raise UserInputError(f"{method_node.where()}: {exc}") from None
    params_node = node.get("params")
    raw = {}
    if params_node is not None:
        params_node.expect_mapping(f"'params' of stage {index + 1}")
        raw = {k: v.value() for k, v in params_node.mapping().items()}
    where = params_node.where() if params_node is not None else node.where()
    params = cls.parse_params(raw, where)
    targets = _globs(node.get("targets"), ["*"])
    ignore = _globs(node.get("ignore"), [])
    return Stage(cls.name, params, targets, ignore)


def _globs(node: "_Node | None", default: list[str]) -> list[str]:
    if node is None:
        return default
    value = node.value()
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserInputError(f"{node.where()}: expected a glob or a list of globs such as ['*.mlp.*'], got {value!r}")
    return value


class _Node:
    """A YAML node that remembers its file and line for error messages."""

    def __init__(self, node: yaml.Node, source: str):
        self.node, self.source = node, source

    def where(self) -> str:
        return f"{self.source}:{self.node.start_mark.line + 1}"

    def value(self) -> Any:
        # Construct straight from the node: re-serializing a null scalar gives a bare "..." that will not parse.
        loader = _Loader("")
        try:
            return loader.construct_object(self.node, deep=True)
        finally:
            loader.dispose()

    def expect_mapping(self, what: str) -> None:
        if not isinstance(self.node, yaml.MappingNode):
            raise UserInputError(f"{self.where()}: {what} must be a mapping of fields, got {self.value()!r}")

    def expect_sequence(self, what: str) -> None:
        if not isinstance(self.node, yaml.SequenceNode):
            raise UserInputError(f"{self.where()}: {what} must be a list, got {self.value()!r}")

    def mapping(self) -> dict[str, "_Node"]:
        return {str(k.value): _Node(v, self.source) for k, v in self.node.value}

    def items(self) -> list["_Node"]:
        return [_Node(v, self.source) for v in self.node.value]

    def get(self, key: str) -> "_Node | None":
        return self.mapping().get(key)

    def check_fields(self, allowed) -> None:
        for k, v in self.node.value:
            if str(k.value) not in allowed:
                line = k.start_mark.line + 1
                raise UserInputError(f"{self.source}:{line}: unknown field '{k.value}'; allowed: {', '.join(allowed)}")
