"""Runtime stages in an artifact: what `sparseforge.save` writes for each attached runtime stage and what
`sparseforge.load` reads back to attach it again.

`sparseforge.json` gets `"runtime": {"stages": [...]}`, one entry per stage in attach order: the method's name,
its params, the stage's targets and ignore globs, the state's JSON `data`, and the names of its tensors. The
tensors go to `sparseforge-runtime.safetensors` under `"{stage index}.{tensor name}"` (no file when no stage has
tensors). Weights are saved with every runtime stage detached, so the checkpoint holds plain modules and
`AutoModelForCausalLM.from_pretrained` loads it (without the runtime stages). Everything read back is checked;
anything malformed is a one-line `UserInputError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any, Iterator

from sparseforge.errors import UserInputError

RUNTIME_TENSORS_FILE = "sparseforge-runtime.safetensors"
_STAGE_KEYS = {"method": str, "params": dict, "targets": list, "ignore": list, "data": dict, "tensors": list}


@contextlib.contextmanager
def detached(model) -> Iterator[list]:
    """Detach the model's runtime stages for the duration (e.g. of `save_pretrained`), then attach them again;
    yields the stages (`methods.base.AttachedStage`) in attach order."""
    from sparseforge.methods.base import attach_stages, detach_stages

    stages = detach_stages(model)
    try:
        yield stages
    finally:
        attach_stages(model, stages)


def write(directory: pathlib.Path, stages: list) -> dict[str, Any]:
    """Write the stages' tensors next to the weights; return the JSON block for `sparseforge.json`."""
    import torch
    from safetensors.torch import save_file

    entries, tensors = [], {}
    for i, attached in enumerate(stages):
        state = attached.state
        data = state.data
        if json.loads(json.dumps(data)) != data:
            # A method bug, not user input: the state would not load back as it was.
            raise ValueError(f"runtime stage {i + 1} ({attached.stage['method']}): state.data does not survive JSON unchanged")
        for name, t in state.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"runtime stage {i + 1} ({attached.stage['method']}): state tensor '{name}' is a {type(t).__name__}")
            # A copy of its own: safetensors refuses tensors that share storage (views of one state tensor).
            tensors[f"{i}.{name}"] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        entries.append({**{k: attached.stage[k] for k in ("method", "params", "targets", "ignore")},
                        "data": data, "tensors": sorted(state.tensors)})
    if tensors:
        save_file(tensors, str(directory / RUNTIME_TENSORS_FILE), metadata={"format": "pt", "sparseforge": "runtime"})
    return {"stages": entries}


def read(directory: str | pathlib.Path, info: dict) -> list[tuple[dict, Any]]:
    """The saved runtime stages of the artifact in `directory` as (stage dict, RuntimeState) pairs, checked."""
    from sparseforge.methods.base import RuntimeState

    directory = pathlib.Path(directory)
    where = f"'{directory / 'sparseforge.json'}'"
    runtime = info.get("runtime") or {}
    if not isinstance(runtime, dict) or not isinstance(runtime.get("stages", []), list):
        raise UserInputError(f"{where}: 'runtime' must be an object with a 'stages' list; re-create the artifact with sparseforge compress")
    entries = runtime.get("stages", [])
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserInputError(f"{where}: runtime stage {i + 1} is a {type(entry).__name__}, not an object; re-create the artifact")
        for key, kind in _STAGE_KEYS.items():
            if not isinstance(entry.get(key), kind):
                got = "missing" if key not in entry else f"a {type(entry[key]).__name__}"
                raise UserInputError(f"{where}: runtime stage {i + 1} field '{key}' is {got}, expected a {kind.__name__}; re-create the artifact")
        if not all(isinstance(g, str) for g in entry["targets"] + entry["ignore"] + entry["tensors"]):
            raise UserInputError(f"{where}: runtime stage {i + 1} 'targets', 'ignore' and 'tensors' must list strings; re-create the artifact")
    wanted = {f"{i}.{name}" for i, e in enumerate(entries) for name in e["tensors"]}
    stored = _read_tensors(directory) if wanted or (directory / RUNTIME_TENSORS_FILE).exists() else {}
    if set(stored) != wanted:
        missing, extra = sorted(wanted - set(stored)), sorted(set(stored) - wanted)
        raise UserInputError(f"'{directory / RUNTIME_TENSORS_FILE}' does not match sparseforge.json's runtime stages "
                             f"(missing {missing[:3]}, unexpected {extra[:3]}); re-create the artifact")
    return [(entry, RuntimeState(tensors={n: stored[f"{i}.{n}"] for n in entry["tensors"]}, data=entry["data"]))
            for i, entry in enumerate(entries)]


def _read_tensors(directory: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    from sparseforge.formats.safetensors_check import check_safetensors

    path = directory / RUNTIME_TENSORS_FILE
    if not path.is_file():
        raise UserInputError(f"'{path}' is missing but sparseforge.json lists runtime tensors; re-create the artifact")
    check_safetensors(path)  # a truncated or corrupt file: one line naming it
    return load_file(str(path), device="cpu")


def attach_saved(model, directory: str | pathlib.Path | None = None) -> list:
    """Build and attach the runtime stages saved with the artifact `model` was loaded from (its
    `sparseforge_info` and `sparseforge_source`). Returns the attached stages (none for a plain checkpoint)."""
    from sparseforge.methods.base import AttachedStage, attach_stages, detach_stages, get_method

    info = getattr(model, "sparseforge_info", None) or {}
    directory = pathlib.Path(directory if directory is not None else getattr(model, "sparseforge_source", "."))
    if not info.get("runtime"):
        return []
    attached = []
    for i, (entry, state) in enumerate(read(directory, info)):
        where = f"'{directory / 'sparseforge.json'}' runtime stage {i + 1}"
        try:
            cls = get_method(entry["method"])
        except UserInputError as exc:
            raise UserInputError(f"{where}: {exc}") from None
        if cls.lifetime != "runtime":
            raise UserInputError(f"{where}: '{cls.name}' is a {cls.lifetime} method, not a runtime one; re-create the artifact")
        params = cls.parse_params(entry["params"], where)
        stage = {"method": cls.name, "params": dataclasses.asdict(params), "targets": entry["targets"], "ignore": entry["ignore"]}
        attached.append(AttachedStage(stage, cls(params), state))
    for i, stage in enumerate(attached):
        try:
            attach_stages(model, [stage])
        except Exception as exc:
            detach_stages(model)  # all or nothing: no half-attached runtime
            if isinstance(exc, UserInputError):
                raise UserInputError(f"'{directory}' runtime stage {i + 1} ({stage.stage['method']}): {exc}") from None
            if isinstance(exc, (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError)):
                detail = str(exc).splitlines()[0] if str(exc) else ""
                raise UserInputError(f"'{directory}' runtime stage {i + 1} ({stage.stage['method']}): its saved state does not fit "
                                     f"this model ({type(exc).__name__}: {detail}); re-create the artifact") from None
            raise
    return attached
