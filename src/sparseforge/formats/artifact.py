"""Artifacts: a Hugging Face checkpoint directory (config.json, safetensors weights, tokenizer) plus
`sparseforge.json` (recipe, what each stage did, versions, metrics, runtime settings).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place at the end,
so an interrupted or failed save leaves no half-written artifact. Loading from user paths reads only
safetensors and JSON; pickled weights are refused.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import shutil
import zlib
from typing import Any

from sparseforge.errors import UserInputError
from sparseforge.formats.output import atomic_directory, check_output_dir  # noqa: F401  (re-exported)
from sparseforge.formats.safetensors_check import check_safetensors, check_safetensors_dir

log = logging.getLogger(__name__)

ARTIFACT_FILE = "sparseforge.json"
# Compact artifacts keep their weights here, not in model.safetensors, so that plain transformers fails
# loudly on them (instead of silently initializing the packed weights at random); `export` converts.
COMPACT_WEIGHTS_FILE = "sparseforge-weights.safetensors"
# ...and an index whose only shard is this missing file, so that `from_pretrained` on a compact artifact fails with
# a FileNotFoundError naming what the directory is and what to do, rather than transformers' generic "no file
# named model.safetensors". README.md in the artifact says the same in words.
COMPACT_MARKER_SHARD = "SPARSEFORGE-COMPACT-ARTIFACT--load-with-sparseforge.load--or-convert-with-sparseforge-export--dense"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "spiece.model", "vocab.txt", "added_tokens.json", "chat_template.jinja")
STORAGES = ("dense", "compact")
FORMAT_VERSION = 1
REFERENCE_MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "reference-model"
REFERENCE_MOE_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "reference-moe"
# Short names for the bundled models, accepted wherever a model path is; a local directory of the same name wins.
BUNDLED_MODELS = {"reference-moe": REFERENCE_MOE_DIR}


def write_json(path: pathlib.Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj):
    if isinstance(obj, pathlib.Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save(model, directory, tokenizer=None, recipe=None, stages=None, metrics=None, overwrite: bool = False, base_model: str | None = None, storage: str = "dense") -> pathlib.Path:
    """Write `model` (and its tokenizer) plus sparseforge.json, atomically.

    storage="dense": a plain Hugging Face checkpoint (pruned weights are stored as zeros).
    storage="compact": sparse projections packed as bitmask + values or N:M values + positions (see
    formats/sparse_storage.py); loads with `sparseforge.load`, converts back with `sparseforge export`."""
    import torch
    import transformers

    import sparseforge

    if storage not in STORAGES:
        raise UserInputError(f"storage '{storage}' is unknown; choose one of {', '.join(STORAGES)}")
    from sparseforge.core.offload import offload_store

    offloaded = offload_store(model) is not None
    if offloaded and storage != "dense":
        raise UserInputError("a disk-offloaded model is saved layer by layer as a dense checkpoint; save with storage 'dense', "
                             "then load it and save again with storage 'compact'")
    from sparseforge.formats import runtime_state

    source = getattr(model, "sparseforge_source", None)
    inputs = [("input model", source), ("offload scratch", getattr(offload_store(model), "scratch", None))]
    # Weights are saved with the runtime stages detached (plain modules); the stages go to their own files.
    with atomic_directory(directory, overwrite, inputs, needed_bytes=_tensor_bytes(model)) as tmp, runtime_state.detached(model) as runtime:
        if offloaded:
            _save_offloaded(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            if storage == "dense" and self_loaded_weights([(s.method, s.state.data) for s in runtime]):
                _store_under_module_names(model, tmp)
        packed, planes = _compact_weights(model, tmp) if storage == "compact" else ({}, {})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            _copy_tokenizer(source, tmp)
        info = dict(getattr(model, "sparseforge_info", None) or {})
        info.update(
            {
                "format_version": FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": {"sparseforge": sparseforge.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
            }
        )
        if base_model is not None:
            info["base_model"] = base_model
        if recipe is not None:
            info["recipe"] = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
        if stages is not None:
            info["stages"] = [s.to_json() if hasattr(s, "to_json") else s for s in stages]
        if metrics is not None:
            info["metrics"] = metrics
        info["runtime"] = runtime_state.write(tmp, runtime)
        info["storage"] = {"format": storage, "tensors": packed} | ({"planes": planes} if planes else {})
        write_json(tmp / ARTIFACT_FILE, info)
        if storage == "compact":
            _write_compact_notice(tmp)
    return pathlib.Path(directory)


# ---- runtime stages that load weights themselves ---------------------------------------------------------------
# A runtime method may declare `self_loaded_weights(state_data) -> [qualified parameter names]`: weights it reads on
# its own after `load` (expert offloading reads one expert at a time). `save` then stores the weights under the
# model's own module names (transformers' from_pretrained reads those too), and `load` leaves the declared ones
# unbuilt (on the meta device) for the stage's attach to read; everything else is read by name as usual.
def self_loaded_weights(stages) -> set[str]:
    """Names declared by (method instance or class, state data) pairs."""
    names: set[str] = set()
    for method, data in stages:
        declare = getattr(method, "self_loaded_weights", None)
        if declare is not None:
            names.update(declare(data))
    return names


def _store_under_module_names(model, directory: pathlib.Path) -> None:
    """Replace what save_pretrained wrote (transformers may rename and split tensors on save, e.g. fused experts
    back into one tensor per expert) by the in-memory state dict, tied tensors once: then a stage can find each
    tensor, and each expert's slice of it, by its module name. Sharded at about 2 GB per file."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        if t.numel() and t.data_ptr() in seen:
            continue
        if t.numel():
            seen.add(t.data_ptr())
        tensors[key] = t.detach().cpu().contiguous()
    for f in directory.glob("*.safetensors"):
        f.unlink()
    for index in directory.glob("*.safetensors.index.json"):
        index.unlink()
    shards, size = [{}], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > (2 << 30):
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _saved_self_loaded_weights(info: dict) -> set[str]:
    """What the artifact's saved runtime stages declare they load themselves (malformed entries: none; attaching
    them later reports the problem)."""
    from sparseforge.methods.base import get_method

    entries = (info.get("runtime") or {}).get("stages", []) if isinstance(info.get("runtime"), dict) else []
    pairs = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("method"), str) and isinstance(entry.get("data"), dict):
            try:
                pairs.append((get_method(entry["method"]), entry["data"]))
            except UserInputError:
                continue
    return self_loaded_weights(pairs)


def _load_leaving_unbuilt(path: pathlib.Path, dtype, leave: set[str]):
    """The model of a dense checkpoint stored under module names, every weight read by name except `leave`, which
    stay on the meta device (built without memory, as disk offload does)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparseforge.core.offload import _CheckpointIndex, _parameters_on_meta, _set_tensor

    config = AutoConfig.from_pretrained(path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    index = _CheckpointIndex(path)
    unknown = sorted(n for n in leave if n not in index.file_of)
    if unknown:
        raise UserInputError(f"'{path}' has no tensor '{unknown[0]}' that its runtime stage reads itself; re-create the artifact")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = [n for n, p in model.named_parameters() if n not in leave and not (tied and p is getattr(output, "weight", None) and n not in index.file_of)]
    missing = [n for n in wanted if n not in index.file_of]
    if missing:
        raise UserInputError(f"'{path}' lacks {len(missing)} weight(s) its config needs (e.g. '{missing[0]}'); the checkpoint is corrupt or incomplete")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, tensor in index.read(wanted).items():
        if tuple(tensor.shape) != shapes[name]:
            raise UserInputError(f"'{path}' stores '{name}' as {list(tensor.shape)}, its config needs {list(shapes[name])}; re-create the artifact")
        _set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    buffers = dict(model.named_buffers())
    stored = [n for n in buffers if n in index.file_of]
    for name, tensor in index.read(stored).items():
        with torch.no_grad():
            buffers[name].copy_(tensor)
    if tied:
        model.tie_weights()
    return model.eval()


def _tensor_bytes(model) -> int:
    """Bytes of the model's tensors, tied ones once (offloaded layers count too): about what a dense save writes."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.device.type != "meta" and t.numel():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _copy_tokenizer(source, directory: pathlib.Path) -> None:
    """`save` without a tokenizer: copy the tokenizer files of the model's source directory, or fetch the
    tokenizer of its hub id, so the artifact stays evaluable; warn if neither works."""
    if source and pathlib.Path(source).is_dir():
        found = [f for f in TOKENIZER_FILES if (pathlib.Path(source) / f).is_file()]
        for f in found:
            shutil.copyfile(pathlib.Path(source) / f, directory / f)
        if found:
            return
    elif source:
        try:
            load_tokenizer(source).save_pretrained(directory)
            return
        except UserInputError:
            pass
    log.warning("saved without a tokenizer (none was given and the model's source %r has none); pass tokenizer= to "
                "sparseforge.save, or evaluation of this artifact will need --tokenizer", source)


def _write_compact_notice(directory: pathlib.Path) -> None:
    write_json(directory / "model.safetensors.index.json",
               {"metadata": {"sparseforge": "compact artifact: weights are packed in " + COMPACT_WEIGHTS_FILE},
                "weight_map": {"sparseforge.compact": COMPACT_MARKER_SHARD}})
    (directory / "README.md").write_text(
        "# sparseforge compact artifact\n\nThe weights in this directory are packed (sparse values + positions, "
        f"losslessly coded) in `{COMPACT_WEIGHTS_FILE}`, which plain `transformers.AutoModelForCausalLM.from_pretrained` "
        "cannot read. Load it with `sparseforge.load(path)`, or convert it once into a plain Hugging Face checkpoint "
        "with `sparseforge export --model PATH --dense OUT`.\n", encoding="utf-8")


def _save_offloaded(model, directory: pathlib.Path) -> None:
    """A sharded Hugging Face checkpoint written one decoder layer at a time, so a disk-offloaded model
    (core.offload) never has more than one layer in memory: shard 1 holds everything outside the decoder
    layers, shard i+2 holds layer i."""
    from safetensors.torch import save_file

    from sparseforge.core.offload import return_freed_memory

    store = model.sparseforge_offload
    prefix = store.prefix + "."
    n_layers = store.adapter.num_layers
    total = n_layers + 1
    shard = lambda k: f"model-{k:05d}-of-{total:05d}.safetensors"  # noqa: E731
    weight_map: dict[str, str] = {}
    size = 0
    rest, seen = {}, set()
    for key, tensor in model.state_dict().items():
        # Tied weights (an LM head sharing the embedding) are stored once, as save_pretrained does.
        if key.startswith(prefix) or (tensor.numel() and tensor.data_ptr() in seen):
            continue
        if tensor.numel():
            seen.add(tensor.data_ptr())
        rest[key] = tensor.detach().to("cpu").contiguous()
    save_file(rest, str(directory / shard(1)), metadata={"format": "pt"})
    weight_map.update({k: shard(1) for k in rest})
    size += sum(t.numel() * t.element_size() for t in rest.values())
    for i in range(n_layers):
        tensors = {f"{prefix}{i}.{n}": t.detach().to("cpu").contiguous() for n, t in store.layer_tensors(i).items()}
        save_file(tensors, str(directory / shard(i + 2)), metadata={"format": "pt"})
        weight_map.update({k: shard(i + 2) for k in tensors})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        return_freed_memory()
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": size}, "weight_map": weight_map})
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)


def _compact_weights(model, directory: pathlib.Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Replace the safetensors that save_pretrained wrote by the in-memory state dict (transformers may
    rename tensors on save, e.g. fused experts), with each sparse projection weight packed (N:M or bitmask). Tied tensors are stored once. Large float tensors (packed values included) are then
    plane-coded. Returns ({tensor name: sparse layout}, {tensor name: plane-coded dtype and shape})."""
    import torch
    from safetensors.torch import save_file

    from sparseforge.core.adapter import ModelAdapter
    from sparseforge.core.masks import check_nm
    from sparseforge.core.quantizer import quantized_weights
    from sparseforge.formats.quant_storage import pack_quantized
    from sparseforge.formats.sparse_storage import encode_planes, pack_bitmask, pack_nm

    files = sorted(directory.glob("*.safetensors"))
    tensors: dict = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue  # a tied copy: restored by tie_weights on load
        seen.add(t.data_ptr())
        tensors[key] = t.detach().cpu().contiguous()
    declared = {}
    for stage in (getattr(model, "sparseforge_info", None) or {}).get("stages", []):
        if ":" in str(stage.get("pattern", "")):
            for name in stage.get("projections", []):
                declared[name] = tuple(int(x) for x in stage["pattern"].split(":"))
    out: dict = {}
    layout: dict[str, dict] = {}
    projection_params = {p.state_key: (n, p) for n, p in ModelAdapter(model).projections().items()}
    quantized = quantized_weights(model)
    for key, t in tensors.items():
        proj = projection_params.get(key)
        transposed = proj is not None and proj[1].kind == "conv1d"
        qw = quantized.get(key)
        # Quantized weights (formats/quant_storage.py), where the weight still is exactly its codes.
        if qw is not None and t.dim() == 2 and torch.equal(qw.dequantize().to(t.dtype), t.t() if transposed else t):
            parts, spec = pack_quantized(qw)
            out.update({f"{key}::{part}": value for part, value in parts.items()})
            layout[key] = spec | {"transposed": transposed, "dtype": str(t.dtype).removeprefix("torch.")}
            continue
        if proj is None or t.numel() < 64:
            out[key] = t
            continue
        name, p = proj
        w = t.t() if p.kind == "conv1d" else t  # pack in [..., out, in] orientation
        # N:M weights keep the values + positions layout that N:M kernels consume (bitmask would be a
        # little smaller at 2:4); anything else goes to bitmask when that beats dense.
        if name in declared and check_nm(w, *declared[name]):
            fmt, parts, extra = "nm", pack_nm(w, *declared[name]), {"n": declared[name][0], "m": declared[name][1]}
        else:
            fmt, parts, extra = "bitmask", pack_bitmask(w), {}
        if sum(x.numel() * x.element_size() for x in parts.values()) >= t.numel() * t.element_size():
            out[key] = t  # not sparse enough to gain anything
            continue
        for part, value in parts.items():
            out[f"{key}::{part}"] = value
        layout[key] = {"format": fmt, "shape": list(w.shape), "transposed": p.kind == "conv1d", **extra}
    planes: dict[str, dict] = {}
    for key in list(out):
        t = out[key]
        if t.is_floating_point() and t.element_size() >= 2 and t.numel() >= 1024:
            parts = encode_planes(t)
            if sum(x.numel() for x in parts.values()) < t.numel() * t.element_size():
                del out[key]
                for part, value in parts.items():
                    out[f"{key}::{part}"] = value
                planes[key] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    for f in files:
        f.unlink()
    for index in directory.glob("*.safetensors.index.json"):
        index.unlink()
    save_file(out, directory / COMPACT_WEIGHTS_FILE, metadata={"format": "pt", "sparseforge": "compact"})
    return layout, planes


def _load_compact(path: pathlib.Path, info: dict, dtype):
    """Build the model from its config and fill it from the packed weights, exactly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = path / COMPACT_WEIGHTS_FILE
    if not weights.is_file():
        raise UserInputError(f"compact artifact '{path}' has no {COMPACT_WEIGHTS_FILE}; copy the whole directory again or re-create it")
    check_safetensors(weights)
    raw = load_file(weights)
    quantized: dict = {}
    try:
        state = _unpack_compact(raw, info["storage"], quantized)
    except UserInputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError, MemoryError, zlib.error) as exc:
        # A bit-flipped or hand-edited sparseforge.json, or packed tensors that do not match it.
        raise UserInputError(f"compact artifact '{path}' is inconsistent ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                             "copy it again or re-create it with sparseforge compress --storage compact") from None
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
        # A hand-edited config.json (unknown dtype or model type, wrong field types) fails inside transformers.
        raise UserInputError(f"compact artifact '{path}' has an unusable config.json ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); copy it again or re-create it") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not match the config
        raise UserInputError(f"compact artifact '{path}' does not match its config ({str(exc).splitlines()[-1].strip()[:160]}); re-create it") from None
    model.tie_weights()
    if quantized:
        from sparseforge.core.quantizer import record_quantized

        record_quantized(model, quantized)  # so kernels and a second save see the codes again
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise UserInputError(f"compact artifact '{path}' does not match its config (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); re-create it")
    return model


def _unpack_compact(raw: dict, storage: dict, quantized: dict | None = None) -> dict:
    """The model's state dict from the compact file's tensors and sparseforge.json's storage section; quantized
    weights' codes also go to `quantized` ({state key: QuantizedWeight}) when given."""
    import torch

    from sparseforge.formats.quant_storage import unpack_quantized
    from sparseforge.formats.sparse_storage import decode_planes, unpack_bitmask, unpack_nm

    for key, spec in storage.get("planes", {}).items():
        parts = {part: raw.pop(f"{key}::{part}") for part in ("planes_top", "planes_rest")}
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype '{spec['dtype']}'")
        raw[key] = decode_planes(parts, dtype, tuple(int(d) for d in spec["shape"]))
    state = {k: v for k, v in raw.items() if "::" not in k}
    for key, spec in storage["tensors"].items():
        parts = {k.split("::", 1)[1]: v for k, v in raw.items() if k.startswith(f"{key}::")}
        shape = tuple(int(d) for d in spec["shape"])
        if spec["format"] == "quant":
            qw = unpack_quantized(parts, spec)
            dtype = getattr(torch, str(spec["dtype"]), None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"unknown dtype '{spec['dtype']}'")
            w = qw.dequantize().to(dtype)
            if quantized is not None:
                quantized[key] = qw
        else:
            w = unpack_nm(parts, shape, int(spec["n"]), int(spec["m"])) if spec["format"] == "nm" else unpack_bitmask(parts, shape)
        state[key] = w.t().contiguous() if spec.get("transposed") else w
    return state


def check_no_remote_code(path: str, trust_remote_code: bool) -> None:
    """Refuse a local model whose config or tokenizer config asks to run Python code shipped with it (`auto_map`),
    unless the user passed --trust-remote-code. transformers would otherwise prompt, or execute it."""
    if trust_remote_code or not pathlib.Path(path).is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        f = pathlib.Path(path) / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserInputError(f"'{f}' is not valid JSON ({type(exc).__name__}); repair or re-download the model") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise UserInputError(f"'{f}' asks to run custom Python code shipped with the model (auto_map); sparseforge does not run "
                                 "a model's own code unless you pass --trust-remote-code (trust_remote_code=True) after reading it")


def resolve_model_path(spec: str | os.PathLike | None) -> str:
    """A local directory (validated), a bundled model's short name (BUNDLED_MODELS) or a hub id; None means the
    bundled reference model."""
    if spec is None:
        return str(REFERENCE_MODEL_DIR)
    text = str(spec)
    path = pathlib.Path(text).expanduser()
    if text in BUNDLED_MODELS and not path.exists():
        path = BUNDLED_MODELS[text]
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserInputError(f"model path '{text}' is not a Hugging Face model directory (no config.json); pass a directory saved by save_pretrained")
        return str(path)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text and text.count(os.sep) > 1
    if looks_like_path or not text.strip():
        raise UserInputError(f"model path '{text}' does not exist; pass an existing model directory, a hub id, or omit --model for the bundled model")
    return text  # a hub id such as "org/name"


def load_model(spec: str | os.PathLike | None = None, device: str | None = None, dtype=None, offload: bool | str | os.PathLike = False,
               trust_remote_code: bool = False, leave_self_loaded: bool = False):
    """Load a causal LM from a directory or hub id (safetensors only) and restore its sparseforge settings.

    leave_self_loaded: leave the weights that the artifact's runtime stages read themselves unbuilt (see
    `self_loaded_weights`); only for a caller that attaches those stages next (`sparseforge.load`).

    offload: leave the decoder layers on disk and read them one at a time while compressing (True: scratch
    files in the system's temporary directory; a path: scratch files there). See core/offload.py.
    trust_remote_code: allow a model that ships its own modelling code to run it (refused by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    local = pathlib.Path(path).is_dir()
    check_no_remote_code(path, trust_remote_code)
    if local:
        check_safetensors_dir(path)
    info_path = pathlib.Path(path) / ARTIFACT_FILE if local else None
    info = read_artifact_info(info_path) if info_path and info_path.is_file() else {}
    if offload:
        from sparseforge.core.offload import load_offloaded

        if not local:
            raise UserInputError(f"disk offload reads a local checkpoint, and '{path}' is not a directory; download the model first")
        if info.get("storage", {}).get("format") == "compact":
            raise UserInputError(f"'{path}' is a compact artifact; disk offload reads dense checkpoints: export it with `sparseforge export` first")
        if device not in (None, "cpu"):
            raise UserInputError("an offloaded model stays on the CPU between layers; pass the compute device to compress instead (--device)")
        model = load_offloaded(path, None if offload is True else str(offload), dtype or torch.float32)
        model.sparseforge_info, model.sparseforge_source = info, path
        return model
    if info.get("storage", {}).get("format") == "compact":
        model = _load_compact(pathlib.Path(path), info, dtype or torch.float32).eval()
        if device:
            model.to(device)
        model.sparseforge_info, model.sparseforge_source = info, path
        return model
    leave = _saved_self_loaded_weights(info) if leave_self_loaded and local and info else set()
    if leave:
        model = _load_leaving_unbuilt(pathlib.Path(path), dtype or torch.float32, leave)
        if device:  # the unbuilt weights stay on meta; the stage that reads them places them
            model._apply(lambda t: t if t.device.type == "meta" else t.to(device))
        model.sparseforge_info, model.sparseforge_source = info, path
        return model
    if local and not any(pathlib.Path(path).glob("*.safetensors")):
        raise UserInputError(
            f"'{path}' has no .safetensors weights; sparseforge never unpickles .bin/.pt files from user paths. "
            "Convert it once with transformers (save_pretrained(..., safe_serialization=True))"
        )
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype or torch.float32,
                                                              trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"could not load model '{path}' ({first}); pass a local model directory or a reachable hub id") from None
    # transformers fills weights a checkpoint lacks with random values and only warns; a renamed (bit-flipped)
    # or missing tensor must not turn into a silently different model.
    missing = list(loading.get("missing_keys") or []) + [k[0] if isinstance(k, tuple) else k for k in loading.get("mismatched_keys") or []]
    if missing:
        raise UserInputError(f"'{path}' lacks or mis-shapes {len(missing)} weight(s) its config needs (e.g. '{missing[0]}'); the checkpoint "
                             "is corrupt or incomplete: download or save it again")
    model.eval()
    if device:
        model.to(device)
    model.sparseforge_info = info
    model.sparseforge_source = path
    return model


def load_tokenizer(spec: str | os.PathLike | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    check_no_remote_code(path, trust_remote_code)
    if pathlib.Path(path).is_dir() and not any((pathlib.Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise UserInputError(f"'{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); pass --tokenizer DIR (e.g. the "
                             "model it was made from), or save it with a tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"could not load a tokenizer for '{path}' ({first}); the model directory needs tokenizer files") from None


def read_artifact_info(path: pathlib.Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"'{path}' is not valid JSON ({exc}); re-create the artifact with sparseforge compress") from None
    if not isinstance(info, dict):
        raise UserInputError(f"'{path}' holds a JSON {type(info).__name__}, not an object; re-create the artifact with sparseforge compress")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise UserInputError(f"'{path}' has format_version {version!r}, this sparseforge reads {FORMAT_VERSION}; upgrade sparseforge or re-create the artifact")
    storage = info.get("storage", {})
    if not isinstance(storage, dict) or storage.get("format", "dense") not in STORAGES or not isinstance(storage.get("tensors", {}), dict) \
            or not isinstance(storage.get("planes", {}), dict):
        raise UserInputError(f"'{path}' has a malformed 'storage' section; re-create the artifact with sparseforge compress")
    for key in ("recipe", "metrics"):  # "runtime" is checked by formats.runtime_state
        if key in info and not isinstance(info[key], (dict, type(None))):
            raise UserInputError(f"'{path}' has a malformed '{key}' section (a JSON {type(info[key]).__name__}); re-create the artifact")
    if not isinstance(info.get("stages", []), list):
        raise UserInputError(f"'{path}' has a malformed 'stages' section; re-create the artifact")
    return info
