"""Expert offloading with prefetch: keep a mixture-of-experts model's expert weights out of its memory (on disk or,
for GPU serving, in CPU memory), load only the experts the router picks into a small cache of `cache_experts`
slots per MoE layer, and prefetch the next layer's likely experts while the current layer runs.

How it hooks in (generic; no per-model code): `core.moe.find_moe_blocks` finds each fused experts module
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, optional biases: every direct parameter whose first dimension is
the expert count). On attach those parameters keep their identity but their storage becomes an empty `[0, ...]`
placeholder; the module's forward is wrapped. Per call the wrapper maps the routed expert ids to cache slots and runs
the module's own forward (whatever `experts_implementation` transformers picked) on the slot buffers with
`num_experts` set to the slot count, so it computes what the fused forward computes: the same products on the same
rows, bit for bit in float32 for top-2 routing and for transformers' batched/grouped implementations (for eager
top-k > 2 the per-token sum may run in a different expert order: equal up to float rounding). A call that routes to
more experts than there are slots (a long prompt) runs in groups of at most `cache_experts` experts, the others marked
with transformers' own expert-parallel sentinel (id = num_experts, weight 0), and the group outputs are added (in
float32 still exact; in bfloat16/float16 each group's output is rounded before the addition: equal up to rounding).

Prefetch (Pre-gated MoE's idea without its trained pre-gate): when layer i's experts are called, layer i+1's router
is applied to layer i's MoE input (the normalized hidden state the experts of layer i receive) and the predicted
experts are loaded into layer i+1's cache on a background thread. We predict from the MoE *input* rather than the
layer's output because it exists earliest: the load then overlaps layer i's expert products, its residual add and
layer i+1's attention, instead of layer i+1's attention only; the residual stream changes little from one layer to
the next, which is what makes the next router's choice on it a useful guess (the hit rate is measured and reported).

Disk reads go straight into the cache slot with positioned reads at the expert's byte offset in the safetensors
file (no mmap, so no file-backed pages in the process and no intermediate copy). After `sparseforge.load` of an
artifact saved with this stage, the loader leaves the expert parameters unbuilt (`self_loaded_weights`) and this
stage reads them from the artifact's own `model.safetensors`, so the full set of experts is never in memory.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import struct
import tempfile
import threading
import weakref
from typing import Any

import torch
from torch import nn

from sparseforge.core.moe import MoEBlock, find_moe_blocks
from sparseforge.core.offload import return_freed_memory, serve_large_allocations_by_mmap
from sparseforge.errors import UserInputError
from sparseforge.methods.base import RuntimeMethod, RuntimeState, param, register

STORAGES = ("disk", "cpu")
POLICIES = ("lru", "lfu")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not a checkpoint we wrote


@dataclasses.dataclass
class ExpertOffloadParams:
    storage: str = param("disk", "where the experts live between uses: disk (a safetensors file, read per expert) or cpu "
                                 "(CPU memory, pinned when CUDA is present: the GPU-serving case)", STORAGES)
    cache_experts: int = param(2, "expert slots per MoE layer held in the model's memory (the expert cache)")
    policy: str = param("lru", "which cached expert a miss evicts: lru (least recently used) or lfu (least often routed, "
                               "ties by recency)", POLICIES)
    prefetch: bool = param(True, "load layer i+1's predicted experts (its router applied to layer i's MoE input) on a "
                                 "background thread while layer i runs")
    offload_dir: str | None = param(None, "directory for the expert file when the experts are in memory at attach "
                                          "(default: the system's temporary directory); unused after sparseforge.load")


# ---- where the experts live ----------------------------------------------------------------------------------
def _safetensors_header(path: pathlib.Path) -> tuple[dict, int]:
    """(header, byte offset of the data section) of a safetensors file, checked enough to read slices safely."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserInputError(f"'{path}' is not a safetensors file (shorter than its header); copy the artifact again")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise UserInputError(f"'{path}' has a corrupt safetensors header; copy the artifact again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserInputError(f"'{path}' has a corrupt safetensors header; copy the artifact again") from None
    return header, 8 + n


class DiskExperts:
    """Fused expert tensors in safetensors files; one expert's slice is read with `os.preadv` into the caller's
    buffer. `keys[(layer, name)] = (file, tensor key)`."""

    def __init__(self, keys: dict[tuple[int, str], tuple[pathlib.Path, str]]):
        self.entries: dict[tuple[int, str], tuple[int, torch.dtype, tuple[int, ...], int]] = {}
        self._fds: dict[pathlib.Path, int] = {}
        headers: dict[pathlib.Path, tuple[dict, int]] = {}
        for where, (path, key) in keys.items():
            if path not in headers:
                headers[path] = _safetensors_header(path)
                self._fds[path] = os.open(path, os.O_RDONLY)
            header, start = headers[path]
            entry = header.get(key)
            if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPES:
                raise UserInputError(f"'{path}' has no floating tensor '{key}'; the artifact does not match its runtime stage, re-create it")
            dtype, shape = _ST_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or start + end > path.stat().st_size:
                raise UserInputError(f"'{path}' tensor '{key}' has inconsistent offsets; copy the artifact again")
            self.entries[where] = (self._fds[path], dtype, shape, start + begin)
        self._finalizer = weakref.finalize(self, _close_all, list(self._fds.values()))

    def shape(self, layer: int, name: str) -> tuple[int, ...]:
        return self.entries[(layer, name)][2]

    def load(self, layer: int, name: str, expert: int, out: torch.Tensor) -> None:
        fd, dtype, shape, offset = self.entries[(layer, name)]
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        target = out if direct else torch.empty(shape[1:], dtype=dtype)
        view = target.view(torch.uint8).reshape(-1).numpy()
        nbytes = view.nbytes
        _pread_exact(fd, memoryview(view), offset + expert * nbytes)
        if not direct:
            out.copy_(target, non_blocking=out.device.type == "cuda")

    def full(self, layer: int, name: str) -> torch.Tensor:
        fd, dtype, shape, offset = self.entries[(layer, name)]
        out = torch.empty(shape, dtype=dtype)
        _pread_exact(fd, memoryview(out.view(torch.uint8).reshape(-1).numpy()), offset)
        return out

    def close(self) -> None:
        self._finalizer()


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise UserInputError("an expert file ended early (truncated?); copy the artifact again")
        done += n


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class MemoryExperts:
    """Fused expert tensors kept in CPU memory (pinned where CUDA can use it, so copies to the GPU are asynchronous)."""

    def __init__(self, tensors: dict[tuple[int, str], torch.Tensor]):
        pin = torch.cuda.is_available()
        self.tensors = {k: (t.pin_memory() if pin else t) for k, t in tensors.items()}

    def shape(self, layer: int, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[(layer, name)].shape)

    def load(self, layer: int, name: str, expert: int, out: torch.Tensor) -> None:
        out.copy_(self.tensors[(layer, name)][expert], non_blocking=out.device.type == "cuda")

    def full(self, layer: int, name: str) -> torch.Tensor:
        return self.tensors[(layer, name)]

    def close(self) -> None:
        self.tensors.clear()


# ---- the cache -------------------------------------------------------------------------------------------------
class ExpertCache:
    """`slots` expert slots of one MoE block: one buffer `[slots, ...]` per expert parameter, which expert each slot
    holds, and the policy's bookkeeping. All methods take the lock (the prefetch thread fills caches too)."""

    def __init__(self, layer: int, names: list[str], shapes: dict[str, tuple], dtype, device, slots: int, num_experts: int,
                 policy: str, store):
        self.layer, self.names, self.slots, self.policy, self.store = layer, names, slots, policy, store
        self.buffers = {n: torch.empty((slots, *shapes[n][1:]), dtype=dtype, device=device) for n in names}
        self.expert_of: list[int | None] = [None] * slots
        self.slot_of: dict[int, int] = {}
        self.last_used = [0] * slots
        self.routed = [0] * num_experts  # how often each expert was routed to (the lfu policy's frequency)
        self.clock = 0
        self.lock = threading.Lock()
        self.loads = 0

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def resident(self) -> list[int]:
        with self.lock:
            return sorted(self.slot_of)

    def _victim(self, protect: set[int]) -> int:
        free = [s for s, e in enumerate(self.expert_of) if e is None]
        if free:
            return free[0]
        candidates = [s for s, e in enumerate(self.expert_of) if e not in protect]
        if self.policy == "lfu":
            return min(candidates, key=lambda s: (self.routed[self.expert_of[s]], self.last_used[s]))
        return min(candidates, key=lambda s: self.last_used[s])

    def ensure(self, experts: list[int], protect: set[int] | None = None, stream=None) -> int:
        """Make `experts` resident (at most `slots` of them), never evicting one in `protect` or in `experts`.
        Returns how many were already resident."""
        protect = set(experts) | set(protect or ())
        hits = 0
        with self.lock:
            for e in experts:
                self.clock += 1
                slot = self.slot_of.get(e)
                if slot is not None:
                    hits += 1
                else:
                    slot = self._victim(protect)
                    old = self.expert_of[slot]
                    if old is not None:
                        del self.slot_of[old]
                    self.expert_of[slot] = None  # not valid while it is being overwritten
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        for n in self.names:
                            self.store.load(self.layer, n, e, self.buffers[n][slot])
                    if stream is not None:
                        stream.synchronize()
                    self.expert_of[slot], self.slot_of[e] = e, slot
                    self.loads += 1
                self.last_used[slot] = self.clock
        return hits


@dataclasses.dataclass
class Stats:
    """Counters since attach (or the last `reset`): calls, routed expert lookups and cache hits among them, experts
    loaded, and prefetch: experts predicted for the next layer and how many of them that layer then routed to."""

    calls: int = 0
    lookups: int = 0
    hits: int = 0
    loads: int = 0
    prefetch_predicted: int = 0
    prefetch_hits: int = 0
    prefetch_loads: int = 0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cache_hit_rate"] = self.hits / self.lookups if self.lookups else None
        out["prefetch_hit_rate"] = self.prefetch_hits / self.prefetch_predicted if self.prefetch_predicted else None
        return out


class _Runtime:
    """Everything one attached stage keeps: the blocks, their caches, the store, the prefetch thread."""

    def __init__(self, blocks: list[MoEBlock], names: dict[int, list[str]], store, params: ExpertOffloadParams, scratch):
        self.blocks, self.names, self.store, self.params, self.scratch = blocks, names, store, params, scratch
        self.caches: dict[int, ExpertCache] = {}
        self.stats = Stats()
        self.next_of = {b.layer_index: nxt for b, nxt in zip(blocks, blocks[1:])}
        self.pending: dict[int, tuple[concurrent.futures.Future, list[int]]] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if params.prefetch else None
        self.stream = None
        self.saved_forward: dict[int, Any] = {}

    def wait(self, layer: int) -> list[int] | None:
        got = self.pending.pop(layer, None)
        if got is None:
            return None
        got[0].result()
        return got[1]

    def wait_all(self) -> None:
        for layer in list(self.pending):
            with contextlib.suppress(Exception):
                self.wait(layer)

    def prefetch(self, block: MoEBlock, hidden: torch.Tensor) -> None:
        """Predict `block`'s experts from `hidden` with its router and load them in the background."""
        cache = self.caches[block.layer_index]
        with torch.no_grad():
            index, _ = block.route(hidden)
        counts = torch.bincount(index.reshape(-1), minlength=block.num_experts)
        order = torch.argsort(counts, descending=True, stable=True)
        predicted = [int(e) for e in order[: cache.slots] if counts[e] > 0]
        self.stats.prefetch_predicted += len(predicted)

        def load():
            before = cache.loads
            cache.ensure(predicted, stream=self.stream)
            self.stats.prefetch_loads += cache.loads - before

        self.pending[block.layer_index] = (self.executor.submit(load), predicted)

    def forward(self, block: MoEBlock, hidden_states, top_k_index, top_k_weights):
        cache = self.caches[block.layer_index]
        module = block.experts
        predicted = self.wait(block.layer_index)
        # .tolist() waits for the device, so no kernel still reads a slot that a prefetch below may overwrite.
        needed = torch.unique(top_k_index).tolist()
        self.stats.calls += 1
        if predicted is not None:
            self.stats.prefetch_hits += len(set(predicted) & set(needed))
        nxt = self.next_of.get(block.layer_index)
        if self.executor is not None and nxt is not None:
            self.prefetch(nxt, hidden_states)
        with cache.lock:
            for e in needed:
                cache.routed[e] += 1
        # Cached (e.g. prefetched) experts first, so the first group uses them before later groups evict them.
        resident = set(cache.resident())
        needed = [e for e in needed if e in resident] + [e for e in needed if e not in resident]
        groups = [needed[i:i + cache.slots] for i in range(0, len(needed), cache.slots)]
        out = None
        for group in groups:
            before = cache.loads
            self.stats.hits += cache.ensure(group)
            self.stats.loads += cache.loads - before
            self.stats.lookups += len(group)
            sentinel = cache.slots
            lut = torch.full((block.num_experts,), sentinel, dtype=top_k_index.dtype, device=top_k_index.device)
            with cache.lock:
                slots = [cache.slot_of[e] for e in group]
            lut[torch.tensor(group, device=lut.device)] = torch.tensor(slots, dtype=lut.dtype, device=lut.device)
            index = lut[top_k_index]
            weights = top_k_weights if len(groups) == 1 else top_k_weights.masked_fill(index == sentinel, 0)
            with _on_slots(module, cache, sentinel_used=len(groups) > 1):
                y = self.saved_forward[block.layer_index](hidden_states, index, weights)
            out = y if out is None else out + y
        return out


@contextlib.contextmanager
def _on_slots(module: nn.Module, cache: ExpertCache, sentinel_used: bool):
    """The experts module computing on the cache's slot buffers, `num_experts` = the slot count (and transformers'
    expert-parallel flag set where sentinel ids are present, so every experts implementation skips them)."""
    placeholders = {n: module._parameters[n] for n in cache.names}
    saved = (module.num_experts, getattr(module, "_is_expert_parallel", None))
    try:
        for n in cache.names:
            module._parameters[n] = cache.buffers[n]
        module.num_experts = cache.slots
        if sentinel_used and saved[1] is not None:
            module._is_expert_parallel = True
        yield
    finally:
        module._parameters.update(placeholders)
        module.num_experts = saved[0]
        if saved[1] is not None:
            module._is_expert_parallel = saved[1]


def expert_parameter_names(block: MoEBlock) -> list[str]:
    """The experts module's own parameters that hold one slice per expert (first dimension = the expert count)."""
    return [n for n, p in block.experts.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == block.num_experts]


def _moe_blocks(model, where: str) -> list[MoEBlock]:
    blocks = find_moe_blocks(model)
    if not blocks:
        raise UserInputError(f"{where}: the model has no mixture-of-experts blocks (no experts module beside a router); "
                             "expert-offload applies to MoE models such as Mixtral, Qwen-MoE or OLMoE")
    unfused = [b.name for b in blocks if not b.fused]
    if unfused:
        raise UserInputError(f"{where}: '{unfused[0]}' keeps its experts as separate modules; expert-offload handles fused "
                             "experts modules (transformers 5's gate_up_proj/down_proj layout)")
    for b in blocks:
        if not isinstance(getattr(b.experts, "num_experts", None), int):
            raise UserInputError(f"{where}: '{b.experts_name}' has no integer num_experts attribute; cannot run it on a cache")
    return blocks


@register
class ExpertOffload(RuntimeMethod):
    name = "expert-offload"
    family = "experts"
    summary = "keep MoE experts on disk or in CPU memory, load routed ones into a per-layer cache, prefetch the next layer's"
    Params = ExpertOffloadParams
    contract_architecture = "mixtral"  # the method contract test needs a model with MoE blocks

    def __init__(self, params=None):
        super().__init__(params)
        self.runtime: _Runtime | None = None

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        w = f"{where}: " if where else ""
        if params.cache_experts < 1:
            raise UserInputError(f"{w}cache_experts {params.cache_experts} must be >= 1 (expert slots per MoE layer), e.g. 2")
        if params.offload_dir is not None and not str(params.offload_dir).strip():
            raise UserInputError(f"{w}offload_dir must be a directory path or null")

    @classmethod
    def example_params(cls) -> dict:
        return {"cache_experts": 2}

    @classmethod
    def self_loaded_weights(cls, data: dict) -> list[str]:
        """Weights this stage reads itself after `sparseforge.load` (the loader leaves them unbuilt): its experts."""
        names = data.get("expert_params", [])
        return [str(n) for n in names] if isinstance(names, list) else []

    def calibrate(self, model, context) -> RuntimeState:
        blocks = _moe_blocks(model, self.name)
        return RuntimeState(data={"expert_params": [f"{b.experts_name}.{n}" for b in blocks for n in expert_parameter_names(b)]})

    # ---- attach / detach ---------------------------------------------------------------------------------------
    def attach(self, model, state: RuntimeState) -> None:
        if self.runtime is not None:
            raise UserInputError(f"{self.name}: this stage is already attached; detach it first")
        p = self.params
        blocks = _moe_blocks(model, self.name)
        names = {b.layer_index: expert_parameter_names(b) for b in blocks}
        params = {(b.layer_index, n): getattr(b.experts, n) for b in blocks for n in names[b.layer_index]}
        if any(t.numel() == 0 for t in params.values()):
            raise UserInputError(f"{self.name}: the experts are already offloaded (empty placeholders); detach the other stage first")
        lazy = all(t.device.type == "meta" for t in params.values())
        if not lazy and any(t.device.type == "meta" for t in params.values()):
            raise UserInputError(f"{self.name}: some expert weights are not loaded (meta) and some are; load the model again")
        scratch = None
        serve_large_allocations_by_mmap()  # so freed expert storage and evicted loads leave the process at once
        if lazy:
            store = self._artifact_store(model, blocks, names, p.storage)
        elif p.storage == "cpu":
            # Shares the parameters' storage on a CPU model (nothing is copied; the placeholders below release it).
            store = MemoryExperts({k: t.detach().to("cpu").contiguous() for k, t in params.items()})
        else:
            store, scratch = self._scratch_store(params)
        wrong = [k for k, t in params.items() if tuple(store.shape(*k)) != tuple(t.shape)]
        if wrong:
            store.close()
            raise UserInputError(f"{self.name}: the stored experts of layer {wrong[0][0]} ('{wrong[0][1]}') do not match the model's "
                                 f"shape {list(params[wrong[0]].shape)}; re-create the artifact")
        runtime = _Runtime(blocks, names, store, p, scratch)
        for b in blocks:
            router_w = b.router.weight
            dtype = next(iter(params[(b.layer_index, n)] for n in names[b.layer_index])).dtype
            device = router_w.device
            shapes = {n: store.shape(b.layer_index, n) for n in names[b.layer_index]}
            runtime.caches[b.layer_index] = ExpertCache(b.layer_index, names[b.layer_index], shapes, dtype, device,
                                                        min(p.cache_experts, b.num_experts), b.num_experts, p.policy, store)
            if device.type == "cuda" and runtime.stream is None and p.prefetch:
                runtime.stream = torch.cuda.Stream(device)
        for (layer, n), t in params.items():
            block = next(b for b in blocks if b.layer_index == layer)
            _set_data(block.experts, n, torch.empty((0, *t.shape[1:]), dtype=t.dtype, device=block.router.weight.device))
        for b in blocks:
            runtime.saved_forward[b.layer_index] = b.experts.forward
            b.experts.forward = _wrapped(runtime, b)
        self.runtime = runtime
        return_freed_memory()  # the released expert storage goes back to the operating system, not glibc's heap

    def detach(self, model) -> None:
        rt = self.runtime
        if rt is None:
            return
        rt.wait_all()
        if rt.executor is not None:
            rt.executor.shutdown(wait=True)
        for b in rt.blocks:
            for n in rt.names[b.layer_index]:
                placeholder = getattr(b.experts, n)
                full = rt.store.full(b.layer_index, n)
                _set_data(b.experts, n, full.to(device=placeholder.device, dtype=placeholder.dtype))
            if "forward" in vars(b.experts):
                del b.experts.forward
        rt.store.close()
        rt.caches.clear()
        if rt.scratch is not None:
            rt.scratch()
        self.runtime = None

    def _scratch_store(self, params: dict[tuple[int, str], torch.Tensor]):
        from safetensors.torch import save_file

        base = pathlib.Path(self.params.offload_dir) if self.params.offload_dir else pathlib.Path(tempfile.gettempdir())
        try:
            base.mkdir(parents=True, exist_ok=True)
            directory = pathlib.Path(tempfile.mkdtemp(prefix=f".experts.sparseforge-offload-{os.getpid()}-", dir=base))
        except OSError as exc:
            raise UserInputError(f"{self.name}: cannot write the expert file to '{base}' ({exc.strerror}); pass a writable offload_dir") from None
        cleanup = weakref.finalize(self, shutil.rmtree, str(directory), True)
        keys = {}
        layers = sorted({layer for layer, _ in params})
        try:
            for layer in layers:  # one file per layer: only one layer's experts are serialized at a time
                path = directory / f"layer-{layer:05d}.safetensors"
                tensors = {n: t.detach().to("cpu").contiguous() for (lay, n), t in params.items() if lay == layer}
                save_file(tensors, str(path))
                keys.update({(layer, n): (path, n) for n in tensors})
        except Exception:
            cleanup()
            raise
        return DiskExperts(keys), cleanup

    def _artifact_store(self, model, blocks, names, storage: str):
        """The experts of a model that `sparseforge.load` left unbuilt, read from its artifact's safetensors."""
        from sparseforge.core.offload import _CheckpointIndex

        source = getattr(model, "sparseforge_source", None)
        if not source or not pathlib.Path(source).is_dir():
            raise UserInputError(f"{self.name}: the experts are not loaded and the model has no local artifact to read them from; "
                                 "load it with sparseforge.load(directory)")
        index = _CheckpointIndex(pathlib.Path(source))
        keys = {}
        for b in blocks:
            for n in names[b.layer_index]:
                key = f"{b.experts_name}.{n}"
                if key not in index.file_of:
                    raise UserInputError(f"{self.name}: '{source}' has no tensor '{key}'; save the model with this stage attached "
                                         "(sparseforge.save) so its experts are stored under their module names")
                keys[(b.layer_index, n)] = (index.file_of[key], key)
        disk = DiskExperts(keys)
        if storage == "disk":
            return disk
        tensors = {k: disk.full(*k) for k in keys}
        disk.close()
        return MemoryExperts(tensors)

    # ---- what it reports ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since attach (cache and prefetch hit rates) and the expert bytes resident now."""
        rt = self.runtime
        if rt is None:
            return {}
        return rt.stats.to_json() | self.memory()

    def reset_stats(self) -> None:
        if self.runtime is not None:
            self.runtime.stats = Stats()

    def memory(self) -> dict[str, Any]:
        """Exact expert bytes: all of them, in the model's cache slots (allocated), and held in host memory by the
        store (storage cpu) or nowhere in the process (storage disk)."""
        rt = self.runtime
        if rt is None:
            return {}
        total = 0
        for (layer, n) in ((b.layer_index, n) for b in rt.blocks for n in rt.names[b.layer_index]):
            shape = rt.store.shape(layer, n)
            total += math.prod(shape) * rt.caches[layer].buffers[n].element_size()
        cached = sum(c.nbytes for c in rt.caches.values())
        host = sum(t.numel() * t.element_size() for t in rt.store.tensors.values()) if isinstance(rt.store, MemoryExperts) else 0
        return {"expert_bytes": total, "cache_bytes": cached, "cache_fraction": cached / total if total else None,
                "host_expert_bytes": host}

    def report(self, state: RuntimeState) -> dict[str, Any]:
        p = self.params
        rt = self.runtime
        out = {"storage": p.storage, "cache_experts": p.cache_experts, "policy": p.policy, "prefetch": p.prefetch}
        if rt is not None:
            out |= {"moe_layers": len(rt.blocks)} | self.memory()
        return out


def _set_data(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter's storage and keep the Parameter object (optimizers and ties that hold it stay valid)."""
    p = module._parameters[name]
    if p.device.type == "meta" or value.device != p.device:
        module._parameters[name] = nn.Parameter(value, requires_grad=p.requires_grad)
    else:
        p.data = value


def _wrapped(runtime: _Runtime, block: MoEBlock):
    def forward(*args, **kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args)) | {k: kwargs.pop(k) for k in names if k in kwargs}
        if kwargs or len(values) != 3:
            raise TypeError(f"{block.experts_name}: expert-offload expects (hidden_states, top_k_index, top_k_weights)")
        return runtime.forward(block, values["hidden_states"], values["top_k_index"], values["top_k_weights"])
    return forward
