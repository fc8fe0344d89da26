"""Disk offload for layer-by-layer compression: keep only one decoder layer's weights in memory.

`load_offloaded(path, offload_dir)` builds the model with its decoder-layer parameters on the `meta` device
(no memory) and loads everything else (embeddings, final norm, LM head) normally. A `LayerStore` attached
to the model as `model.sparseforge_offload` reads a layer's tensors from the checkpoint's safetensors files
when the calibration walk reaches it (`materialize`), and after the method has changed it, writes the layer
to a scratch file in the offload directory and drops it from memory again (`release`). Later walks (a second
recipe stage) read the scratch file. `formats.artifact.save` streams such a model to disk layer by layer.

Peak memory is then the non-layer weights, one layer, its calibration statistics and the activations,
instead of the whole model: what lets a model larger than RAM be pruned on a small machine.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import pathlib
import shutil
import tempfile
import weakref

import torch
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.surgery import replace_parameter
from sparseforge.errors import UserInputError
from sparseforge.formats.output import disk_full, is_disk_full, remove_stale_scratch, scratch_prefix

META = torch.device("meta")


@contextlib.contextmanager
def _parameters_on_meta():
    """While active, every parameter a module registers is replaced by a `meta` tensor of the same shape
    (buffers such as rotary frequencies are still computed for real). Parameters are created with
    torch.empty, which reserves but never touches memory, so building even a large model costs nothing."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device != META:
            module._parameters[name] = nn.Parameter(param.to(META), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def serve_large_allocations_by_mmap(threshold: int = 4 << 20) -> None:
    """Make glibc serve allocations of `threshold` bytes or more with mmap, so each is returned to the
    operating system the moment it is freed (by default glibc raises this threshold as it sees large frees and
    then keeps such blocks). Process-wide; set when a model is loaded with disk offload. No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def return_freed_memory() -> None:
    """Hand memory freed by dropped layers back to the operating system. glibc's allocator keeps freed
    blocks of this size in its heap, so without this the process's resident memory grows by about the whole
    model over one walk even though only one layer is alive at a time (measured in
    benchmarks/offload_memory.py). A no-op where glibc's malloc_trim is not available."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class _CheckpointIndex:
    """Which safetensors file holds each tensor of a local Hugging Face checkpoint."""

    def __init__(self, directory: pathlib.Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.file_of = {str(k): directory / str(v) for k, v in weight_map.items()}
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserInputError(f"'{index}' is not a valid checkpoint index ({type(exc).__name__}); download or save the model again") from None
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise UserInputError(f"'{directory}' has no .safetensors weights; disk offload reads safetensors checkpoints only")
            from safetensors import safe_open

            self.file_of = {}
            for f in files:
                with safe_open(str(f), "pt") as fh:
                    self.file_of.update({k: f for k in fh.keys()})

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [k for k in keys if k not in self.file_of]
        if missing:
            raise UserInputError(
                f"checkpoint has no tensor '{missing[0]}' ({len(missing)} missing); disk offload needs a checkpoint whose "
                "tensor names match the model's: load it normally once and save it with sparseforge.save or save_pretrained"
            )
        by_file: dict[pathlib.Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for f, names in by_file.items():
            with safe_open(str(f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in names})
        return out


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    replace_parameter(module, dotted, nn.Parameter(value, requires_grad=False))


class LayerStore:
    """Where the decoder layers of an offloaded model live between uses (see the module docstring)."""

    def __deepcopy__(self, memo):
        raise UserInputError("a disk-offloaded model cannot be copied; compress it in place (its source checkpoint is never modified)")

    def __init__(self, model: nn.Module, source: pathlib.Path, offload_dir: str | None, dtype: torch.dtype):
        self.adapter = ModelAdapter(model)
        self.prefix = self.adapter.layer_list_name
        self.source = _CheckpointIndex(source)
        self.dtype = dtype
        base = pathlib.Path(offload_dir) if offload_dir else pathlib.Path(tempfile.gettempdir())
        created = []  # directories made here, innermost first: removed again with the scratch
        probe = base
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        try:
            base.mkdir(parents=True, exist_ok=True)
            remove_stale_scratch(base, "offload")
            self.scratch = pathlib.Path(tempfile.mkdtemp(prefix=scratch_prefix("offload", "offload"), dir=base))
        except OSError as exc:
            _remove_empty(created)
            if is_disk_full(exc):
                raise disk_full(base, exc) from None
            raise UserInputError(f"cannot write to offload directory '{base}' ({exc.strerror}); pass a writable --offload-dir") from None
        self._written: set[int] = set()
        self.walking = False  # set by the calibration walk, the one caller allowed to run the model
        # Scratch files are removed with the store (close, garbage collection or interpreter exit).
        self._cleanup = weakref.finalize(self, _remove_scratch, str(self.scratch), created)

    def layer_keys(self, index: int) -> dict[str, str]:
        """Parameter name inside layer `index` -> checkpoint key."""
        layer = self.adapter.layers[index]
        return {name: f"{self.prefix}.{index}.{name}" for name, _ in layer.named_parameters(remove_duplicate=False)}

    def is_resident(self, index: int) -> bool:
        return all(p.device != META for p in self.adapter.layers[index].parameters())

    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The current tensors of layer `index` by parameter name (from memory, the scratch file or the checkpoint)."""
        layer = self.adapter.layers[index]
        if self.is_resident(index):
            return {n: p.data for n, p in layer.named_parameters(remove_duplicate=False)}
        keys = self.layer_keys(index)
        if index in self._written:
            from safetensors.torch import load_file

            return load_file(str(self._scratch_file(index)))
        tensors = self.source.read(list(keys.values()))
        return {name: tensors[key].to(self.dtype) if tensors[key].is_floating_point() else tensors[key] for name, key in keys.items()}

    def materialize(self, index: int, device: torch.device | str = "cpu") -> None:
        if self.is_resident(index):
            return
        layer = self.adapter.layers[index]
        for name, tensor in self.layer_tensors(index).items():
            _set_tensor(layer, name, tensor.to(device))

    def release(self, index: int) -> None:
        """Write layer `index` to its scratch file and free its memory."""
        from safetensors.torch import save_file

        layer = self.adapter.layers[index]
        if not self.is_resident(index):
            return
        tensors = {n: p.data.detach().to("cpu").contiguous() for n, p in layer.named_parameters(remove_duplicate=False)}
        tmp = self._scratch_file(index).with_suffix(".partial")
        try:
            save_file(tensors, str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(self.scratch, exc, sum(t.numel() * t.element_size() for t in tensors.values())) from None
            raise
        tmp.replace(self._scratch_file(index))
        self._written.add(index)
        for name, tensor in tensors.items():
            _set_tensor(layer, name, torch.empty(tensor.shape, dtype=tensor.dtype, device=META))
        del tensors
        return_freed_memory()

    @contextlib.contextmanager
    def borrowed(self, index: int):
        """Layer `index` in memory for reading only; dropped again afterwards (nothing is written back)."""
        was_resident = self.is_resident(index)
        self.materialize(index)
        try:
            yield self.adapter.layers[index]
        finally:
            if not was_resident:
                layer = self.adapter.layers[index]
                for name, p in list(layer.named_parameters(remove_duplicate=False)):
                    _set_tensor(layer, name, torch.empty(p.shape, dtype=p.dtype, device=META))
                return_freed_memory()

    def close(self) -> None:
        self._cleanup()

    def _scratch_file(self, index: int) -> pathlib.Path:
        return self.scratch / f"layer-{index:05d}.safetensors"


def _remove_empty(directories: list[pathlib.Path]) -> None:
    for directory in directories:  # innermost first
        try:
            directory.rmdir()
        except OSError:
            break


def _remove_scratch(scratch: str, created: list[pathlib.Path]) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    _remove_empty(created)


def load_offloaded(path: str | pathlib.Path, offload_dir: str | None = None, dtype: torch.dtype | None = None):
    """A causal LM from a local safetensors checkpoint with its decoder layers left on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = pathlib.Path(path)
    if not source.is_dir():
        raise UserInputError(f"disk offload needs a local model directory, got '{path}'; download the model first")
    config = AutoConfig.from_pretrained(source)
    dtype = dtype or torch.float32
    serve_large_allocations_by_mmap()
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    store = LayerStore(model, source, offload_dir, dtype)
    layer_params = {id(p) for p in store.adapter.layers.parameters()}
    rest = {n: p for n, p in model.named_parameters() if id(p) not in layer_params}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = getattr(output, "weight", None)
    wanted = {n: p for n, p in rest.items() if not (tied and p is output_weight and n not in store.source.file_of)}
    tensors = store.source.read(list(wanted))
    for name, tensor in tensors.items():
        _set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    if tied:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device == META and id(p) not in layer_params]
    if still_meta:
        raise UserInputError(f"checkpoint '{source}' did not provide '{still_meta[0]}'; disk offload cannot load this model")
    model.sparseforge_offload = store
    model.register_forward_pre_hook(_refuse_forward(store))
    return model


def _refuse_forward(store: LayerStore):
    def hook(module, args):
        if not store.walking:
            raise UserInputError("this model's decoder layers are offloaded to disk, so it cannot run; save it with "
                                 "sparseforge.save and load the saved copy to evaluate or generate")
    return hook


def offload_store(model: nn.Module) -> LayerStore | None:
    return getattr(model, "sparseforge_offload", None)
