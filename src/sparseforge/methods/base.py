"""The method registry: the one place methods are found. A method is a class with a `Params` dataclass
(its recipe parameters, with defaults and one-line help in field metadata) registered under a unique name."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, ClassVar, Iterable

from sparseforge.errors import UserInputError

REGISTRY: dict[str, type["Method"]] = {}


def param(default, help: str, choices: tuple | Callable[[], Iterable[str]] | None = None):
    """A recipe parameter with its default and a one-line description (shown by `sparseforge methods`).

    `choices` is a tuple, or a function returning the allowed values when a recipe is checked: choices that
    come from a registry (kernels, other methods) are only complete once every module has registered."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def resolve_choices(choices) -> tuple | None:
    """The allowed values of a parameter: its tuple, or what its choices function returns now."""
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def registered(where: Callable[[type["Method"]], bool]) -> Callable[[], tuple[str, ...]]:
    """Choices for a parameter that names another method: the registered methods for which `where` holds."""

    def names() -> tuple[str, ...]:
        return tuple(name for name, cls in all_methods().items() if where(cls))

    return names


@dataclasses.dataclass
class NoParams:
    pass


class Method:
    """Base of every method family. Subclasses set `name`, `family`, `summary` and `Params`.

    `lifetime` says when a method acts: a "transform" changes weights or structure once inside `compress`
    (`apply`), a "runtime" method (`RuntimeMethod`) calibrates once and then acts every time the model runs."""

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    lifetime: ClassVar[str] = "transform"

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def parse_params(cls, raw: dict[str, Any], where: str = "") -> Any:
        """Build `Params` from a plain dict, with errors that name the field, the bad value and what is allowed."""
        where = f"{where}: " if where else ""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        hints = typing.get_type_hints(cls.Params)
        clean = {}
        for key, value in (raw or {}).items():
            if key not in fields:
                allowed = ", ".join(fields) or "none"
                raise UserInputError(f"{where}unknown parameter '{key}' for method '{cls.name}'; allowed: {allowed}")
            choices = resolve_choices(fields[key].metadata.get("choices"))
            clean[key] = _coerce(value, hints[key], f"{where}parameter '{key}' of '{cls.name}'", choices)
        try:
            params = cls.Params(**clean)
        except TypeError as exc:  # pragma: no cover - a Params class without defaults
            raise UserInputError(f"{where}{exc}") from None
        cls.validate(params, where)
        return params

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        """Check values together (ranges, conflicts); raise UserInputError. Override per method."""

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        """Parameters the method contract test runs with (tests/test_method_contract.py): small enough for a
        tiny model in seconds. Default: none, i.e. the Params defaults. Override where those are slow."""
        return {}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        hints = typing.get_type_hints(cls.Params)
        rows = []
        for f in dataclasses.fields(cls.Params):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append({"name": f.name, "type": _type_name(hints[f.name]).replace("NoneType", "null"), "default": default,
                         "help": f.metadata.get("help", ""), "choices": resolve_choices(f.metadata.get("choices"))})
        return rows


@dataclasses.dataclass
class RuntimeState:
    """What a runtime method calibrated: tensors (saved as safetensors) and plain JSON (thresholds, head
    patterns, speed-gate timings). Never pickled. Tensor names are the method's own; `data` must survive
    `json.dumps` unchanged (str keys; str, int, float, bool, None, lists and dicts of them)."""

    tensors: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RuntimeContext:
    """What `RuntimeMethod.calibrate` gets besides the model, from the recipe stage and `compress`.

    tokenizer: the model's tokenizer (None when `compress` was given none); calibration: the recipe's
    `CalibrationConfig` (text source, samples, sequence length, seed, device); progress: whether to show progress
    bars; targets / ignore: the stage's globs over qualified module names (`ModelAdapter.select` for projections)."""

    tokenizer: Any = None
    calibration: Any = None  # core.calibration.CalibrationConfig; typed loosely so this module imports no torch
    progress: bool = False
    targets: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    ignore: list[str] = dataclasses.field(default_factory=list)


class RuntimeMethod(Method):
    """A method that acts while the model runs (KV presses, activation thresholds, sparse attention, sparse
    kernels). `calibrate` runs once at compress time; `attach` hooks the model up from the state (also after
    `sparseforge.load`, on a freshly built instance with the same params), `detach` undoes it so the model's
    outputs are bit-identical to before `attach`. `report` adds method-specific fields to the stage report."""

    lifetime: ClassVar[str] = "runtime"

    def calibrate(self, model, context: RuntimeContext) -> RuntimeState:
        """Measure what the method needs on `model` (the model the transforms before it produced). Default:
        nothing to calibrate."""
        return RuntimeState()

    def attach(self, model, state: RuntimeState) -> None:
        raise NotImplementedError

    def detach(self, model) -> None:
        raise NotImplementedError

    def report(self, state: RuntimeState) -> dict[str, Any]:
        """Method-specific fields of the stage report, after `attach` (JSON values)."""
        return {}


@dataclasses.dataclass
class AttachedStage:
    """One runtime stage attached to a model: the recipe stage as a dict (method, params, targets, ignore),
    the method instance that attached it, and its state."""

    stage: dict[str, Any]
    method: RuntimeMethod
    state: RuntimeState


RUNTIME_ATTR = "sparseforge_runtime"


def attached_stages(model) -> list[AttachedStage]:
    """The runtime stages attached to `model`, in the order they were attached."""
    return list(getattr(model, RUNTIME_ATTR, None) or [])


def attach_stages(model, stages: Iterable[AttachedStage]) -> list[AttachedStage]:
    """Attach each stage in order (on top of any already attached) and record them on the model."""
    stages = list(stages)
    done = attached_stages(model)
    for stage in stages:
        stage.method.attach(model, stage.state)
        done.append(stage)
        setattr(model, RUNTIME_ATTR, list(done))  # recorded per stage, so a failure leaves the record true
    return stages


def detach_stages(model) -> list[AttachedStage]:
    """Detach every runtime stage, last attached first (each undoes what it did on the model it found), and
    return them in attach order so `attach_stages(model, them)` restores the same runtime."""
    stages = attached_stages(model)
    for i in range(len(stages) - 1, -1, -1):
        stages[i].method.detach(model)
        setattr(model, RUNTIME_ATTR, stages[:i])
    if hasattr(model, RUNTIME_ATTR):
        delattr(model, RUNTIME_ATTR)
    return stages


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    import sparseforge.methods  # noqa: F401  (importing the package registers every method)

    if name not in REGISTRY:
        raise UserInputError(f"unknown method '{name}'; registered methods: {', '.join(sorted(REGISTRY))} (see `sparseforge methods`)")
    return REGISTRY[name]


def all_methods() -> dict[str, type[Method]]:
    import sparseforge.methods  # noqa: F401

    return dict(sorted(REGISTRY.items()))


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, what: str, choices):
    """Accept a YAML value for a field of type `tp` (int for float is fine; bool is never a number)."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, what, choices)
            except UserInputError:
                pass
        raise UserInputError(f"{what} got {value!r}; expected {_type_name(tp).replace('NoneType', 'null')}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{what} got {value!r}; expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{what} got {value!r}; expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{what} got {value!r}; expected true or false")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserInputError(f"{what} got {value!r}; expected a string")
        value = str(value)
        if choices and value not in choices:
            raise UserInputError(f"{what} got {value!r}; allowed: {', '.join(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserInputError(f"{what} got {value!r}; expected a list")
        return list(value)
    return value
