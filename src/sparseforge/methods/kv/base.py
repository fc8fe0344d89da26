"""Shared machinery of the KV-cache family: a cache layer that can forget tokens, the hooks that attach a press to
any adapter-supported model, the attention wrapper that lends presses the model's own queries, and exact cache
byte counting.

How a press acts on a running model (generic, no per-model code):

* A forward **pre-hook** (with kwargs) on every attention module finds the transformers `Cache` the model passes
  in (whatever the keyword: `cache`, `layer_past`, ...) and swaps that layer's `DynamicLayer` for the press's own
  layer class (`PressLayer` by default) before the attention writes into it. The swap keeps the tensors.
* The model's attention implementation is wrapped through `transformers.AttentionInterface` (name
  `sparseforge_kv:<inner>`, mask functions of `<inner>`): the wrapper receives the query exactly as the model
  computed it (after q_proj, q-norm, partial or full rotary, for every architecture) and keeps the last queries the
  press scores with; it also rebuilds the attention mask of a layer whose cache holds a different number of tokens
  than the one the model sized its mask from (per-layer budgets, per-head caches). Attention itself still runs in
  the inner implementation (sdpa or eager), so no model is forced to eager attention.
* A forward **hook** (with kwargs) on every attention module compresses that layer's cache right after its
  attention ran (kvpress's hook point), so the prompt's own forward pass sees the full context.

A `PressLayer` keeps `seen` (tokens fed so far) apart from the tokens it holds: `get_seq_length()` reports `seen`,
so the model's next position ids stay right after eviction, and `get_mask_sizes()` reports the held tokens with the
offset that makes every held token visible to the new queries (the same device `DynamicSlidingWindowLayer` uses).
Limitation: batches must not be left-padded while a press is attached (the rebuilt masks assume every cached
token precedes every new query, which padding breaks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.errors import UserInputError
from sparseforge.eval.perplexity import cache_argument  # noqa: F401  (re-exported for the family)
from sparseforge.methods.base import RuntimeMethod, RuntimeState, param

try:
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError as exc:  # pragma: no cover - transformers 5 is a dependency
    raise ImportError("sparseforge.methods.kv needs transformers >= 5 (Cache layers, AttentionInterface)") from exc

ATTENTION_PREFIX = "sparseforge_kv:"
# The sparse-attention family's implementation (methods/attention): a press attached after it wraps it like sdpa.
ATTENTION_IMPL = "sparseforge_attn:sdpa"
# Attributes on the model that say which press is attached (read by eval and generate).
_MODEL_ATTR = "_sparseforge_kv_press"


# ----------------------------------------------------------------------------- cache layers


class PressLayer(DynamicLayer):
    """A dynamic cache layer that can drop tokens per KV head (the same number in every head, so the cache stays
    one `[batch, kv_heads, held, head_dim]` tensor and eviction frees memory). `extras` holds per-token statistics
    `[batch, kv_heads, held]` a press keeps in step with the keys (H2O's accumulated attention)."""

    is_croppable = False  # assisted decoding's crop assumes held == seen

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = 0
        self.last_update = 0
        self.budget: int | None = None  # tokens per head kept while decoding, once a prefill was compressed
        self.extras: dict[str, torch.Tensor] = {}

    @classmethod
    def adopt(cls, old: DynamicLayer, **kwargs) -> "PressLayer":
        """A PressLayer holding what `old` holds (used when a press meets a cache the model created)."""
        new = cls(**kwargs)
        if getattr(old, "is_initialized", False) and old.keys is not None and old.keys.numel() > 0:
            new.lazy_initialization(old.keys, old.values)
            new._store(old.keys, old.values)
            new.seen = old.get_seq_length()
        return new

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.last_update = key_states.shape[-2]
        return out

    def held(self) -> int:
        """Tokens held per head (<= seen)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held()
        return held + query_length, self.seen - held

    def keep(self, index: torch.Tensor) -> None:
        """Keep the tokens at `index` `[batch, kv_heads, n]` (ascending), dropping the rest; memory is freed."""
        if bool((index == index[:1, :1]).all()):
            # One selection for every head (StreamingLLM, TOVA): a plain index_select, several times faster than
            # a gather with a per-element index.
            flat = index[0, 0]
            self.keys = self.keys.index_select(2, flat)
            self.values = self.values.index_select(2, flat)
            self.extras = {k: v.index_select(2, flat) for k, v in self.extras.items()}
            return
        gather = index.unsqueeze(-1).expand(*index.shape, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather).contiguous()
        self.values = self.values.gather(2, index.unsqueeze(-1).expand(*index.shape, self.values.shape[-1])).contiguous()
        self.extras = {k: v.gather(2, index).contiguous() for k, v in self.extras.items()}

    def crop(self, tokens_to_remove: int) -> None:
        raise UserInputError("a compressed KV cache cannot be cropped; detach the press before assisted decoding")

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.last_update = 0
        self.budget = None
        self.extras = {}


def cache_bytes(cache) -> int:
    """Exact bytes of every tensor a cache holds (keys, values, quantized codes and scales, per-token statistics):
    the storage behind each tensor, counted once, so a view that keeps a larger buffer alive counts the buffer."""
    seen: set[int] = set()
    total = 0

    def visit(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if obj.numel() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif depth < 3 and isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)

    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            visit(value)
    return total


def full_cache_bytes(cache, dtype: torch.dtype | None = None) -> int:
    """Bytes the same cache would take uncompressed (every seen token in every head, in `dtype`, default the keys'
    dtype): the denominator of a compression factor."""
    total = 0
    for layer in getattr(cache, "layers", []):
        ref = getattr(layer, "reference_shape", None)
        if ref is None:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            ref = (keys.shape[0], keys.shape[1], keys.shape[3], keys.dtype)
        batch, heads, dim, ref_dtype = ref
        element = torch.tensor([], dtype=dtype or ref_dtype).element_size()
        total += 2 * batch * heads * layer.get_seq_length() * dim * element
    return total


# ----------------------------------------------------------------------------- params


@dataclasses.dataclass
class KVPressParams:
    compression_ratio: float = param(0.5, "fraction of the prompt's cached tokens removed per KV head, in [0, 1) (kvpress's convention)")


def prefix(where: str) -> str:
    """`where` as the start of an error message ("file:line: "), whether or not it already ends with ': '."""
    return where if not where or where.endswith(": ") else f"{where}: "


def check_ratio(value: float, where: str, name: str = "compression_ratio") -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UserInputError(f"{where}{name} must lie in [0, 1), got {value!r}; 0.75 keeps a quarter of the cache")


def check_positive(value: int, where: str, name: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise UserInputError(f"{where}{name} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------- attention helpers


def attention_mass(module: nn.Module, queries: torch.Tensor, keys: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Sum over `queries` of their attention probabilities over `keys`, averaged over each KV head's query group:
    `[batch, kv_heads, held]` in float32.

    `queries` `[batch, q_heads, w, dim]` are the last `w` queries of the forward that just wrote into the cache and
    `keys` `[batch, kv_heads, held, dim]` the cache after that write, so query j sees keys k <= held - w + j (the
    causal rule). Queries are taken `chunk` at a time so the weights never exceed `[.., chunk, held]`."""
    batch, q_heads, w, dim = queries.shape
    kv_heads, held = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    scaling = getattr(module, "scaling", None) or dim**-0.5
    k = keys.float()
    q = queries.float().reshape(batch, kv_heads, group, w, dim)
    total = torch.zeros(batch, kv_heads, held, dtype=torch.float32, device=keys.device)
    key_pos = torch.arange(held, device=keys.device)
    for start in range(0, w, chunk):
        qc = q[:, :, :, start : start + chunk]
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qc, k) * scaling
        limit = held - w + start + torch.arange(qc.shape[3], device=keys.device)
        scores = scores.masked_fill(key_pos[None, :] > limit[:, None], float("-inf"))
        total += scores.softmax(-1).sum(dim=(2, 3)) / group
    return total


def _suffix_causal_mask(q_len: int, kv_len: int, like: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Mask for `q_len` new queries over `kv_len` keys whose last `q_len` are the new tokens: every earlier key is
    visible, the new ones causally. Boolean (True = attend) when the model's own mask was boolean, else additive."""
    past = kv_len - q_len
    allowed = torch.arange(kv_len, device=device)[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
    allowed = allowed[None, None]
    if like is not None and like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def fit_mask(mask, query: torch.Tensor, kv_len: int):
    """The model's mask if it fits this layer's keys, else one rebuilt for them (None where none is needed)."""
    q_len = query.shape[2]
    if mask is not None and mask.shape[-1] == kv_len and mask.shape[-2] == q_len:
        return mask
    if q_len == 1 or (mask is None and kv_len == q_len):
        return None  # one query sees everything; equal lengths: the inner implementation's causal path
    return _suffix_causal_mask(q_len, kv_len, mask, query.dtype, query.device)


def _wrapped_attention(module, query, key, value, attention_mask, **kwargs):
    hook: _ModuleHook | None = getattr(module, "_sparseforge_kv_hook", None)
    if hook is None:  # a module of the same config that no press attached to
        inner = _inner_function(module, _inner_name(module))
        return inner(module, query, key, value, attention_mask, **kwargs)
    return hook.attend(module, query, key, value, attention_mask, **kwargs)


def _inner_function(module, name: str):
    """The attention function `name` means for `module`. "eager" is not in transformers' registry: every model
    file defines its own `eager_attention_forward` (softcapping, sinks, ...), found here by that name in the
    module's own source module."""
    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    import sys

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise UserInputError(
            f"cannot find the eager attention of {type(module).__name__}; load the model with attn_implementation='sdpa'"
        )
    return eager


def _inner_name(module) -> str:
    name = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    return name[len(ATTENTION_PREFIX):] if name.startswith(ATTENTION_PREFIX) else name


def _register_wrapper(inner: str) -> str:
    name = ATTENTION_PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapped_attention)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS and inner in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _configs(model) -> list:
    """The model's config and its sub-configs (multimodal models keep a text config inside)."""
    root = getattr(model, "config", None)
    found = [root] if root is not None else []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and all(cfg is not c for c in found):
            found.append(cfg)
    return found


def find_cache(args, kwargs) -> Cache | None:
    for value in kwargs.values():
        if isinstance(value, Cache):
            return value
    for value in args:
        if isinstance(value, Cache):
            return value
    return None


@dataclasses.dataclass
class _ModuleHook:
    """Per attention module: which press, which cache layer, which inner attention implementation."""

    press: "KVPress"
    index: int
    inner: Any  # the attention function the model would have called
    layer: Any = None  # the cache layer of the forward in flight (set by the pre-hook)
    queries: torch.Tensor | None = None  # the last queries the press asked for, from this forward

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        inner = self.inner
        layer = self.layer
        want = self.press.query_window if layer is not None else 0
        if want:
            # A copy of the window, so the whole query tensor is not kept alive until the post-hook.
            self.queries = query if want < 0 or want >= query.shape[2] else query[:, :, -want:].clone()
        if layer is not None and hasattr(layer, "attend"):
            return layer.attend(inner, module, query, key, value, attention_mask, **kwargs)
        return inner(module, query, key, value, fit_mask(attention_mask, query, key.shape[-2]), **kwargs)


# ----------------------------------------------------------------------------- the press base


class KVPress(RuntimeMethod):
    """Base of the KV-cache family. A scoring press implements `score()` -> `[batch, kv_heads, held]` (higher is
    kept); top-k selection per KV head, the hooks, the schedule and the bookkeeping are shared here.

    Schedule (when a layer is compressed, right after its attention ran):
    * default: the first forward that fills an empty cache with more than one token (the prompt's prefill) keeps
      `target(layer, seen)` tokens per head, `round(seen * (1 - compression_ratio))`; later multi-token forwards
      (a question after a compressed document) are not compressed; one-token decode steps evict down to the prefill
      budget when the press supports decoding (`decodes`).
    * `with press.schedule(every_forward=True)`: every multi-token forward compresses to the ratio of all tokens
      seen (kv_perplexity).
    * `with press.schedule(prompt_len=N)`: every forward compresses to the budget of an N-token prompt, so chunked
      prefill never holds more than budget + one chunk (`methods.kv.prefill`).
    """

    family: ClassVar[str] = "kv"
    Params: ClassVar[type] = KVPressParams
    # Last queries of a forward the score needs: 0 none, -1 all of them, n the last n.
    query_window: ClassVar[int] = 0
    decodes: ClassVar[bool] = False  # keeps the cache at its budget while decoding
    chunks: ClassVar[bool] = True  # can compress after each prefill chunk against what the cache already holds
    layer_class: ClassVar[type] = PressLayer

    def __init__(self, params=None):
        super().__init__(params)
        self._hooks: list = []
        self._modules: list[nn.Module] = []
        self._model_ref = None
        self._saved_impl: list[tuple[Any, str]] = []
        self._every_forward = False
        self._prompt_len: int | None = None
        self.peak_cache_bytes = 0
        self.state = RuntimeState()

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        if hasattr(params, "compression_ratio"):
            check_ratio(params.compression_ratio, prefix(where))

    # ---- what a press defines

    def score(self, module: nn.Module, layer: PressLayer, queries: torch.Tensor | None, index: int) -> torch.Tensor:
        """Importance of each held token, `[batch, kv_heads, held]`; the highest `target` per head are kept."""
        raise NotImplementedError

    def target(self, index: int, tokens: int) -> int:
        """Tokens per head to keep in layer `index` for a sequence of `tokens` tokens."""
        return max(1, min(tokens, round(tokens * (1.0 - self.params.compression_ratio))))

    def observe(self, module: nn.Module, layer: PressLayer, queries: torch.Tensor | None, index: int) -> None:
        """Called after every forward before any compression (H2O accumulates attention here)."""

    # ---- shared eviction

    def compress_layer(self, module, layer: PressLayer, queries, index: int, n_keep: int) -> None:
        held = layer.held()
        if held <= n_keep:
            return
        scores = self.score(module, layer, queries, index)
        keep = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
        layer.keep(keep)

    def after_forward(self, module, layer, queries, index: int, cache) -> None:
        if not isinstance(layer, PressLayer):
            return
        if self.query_window and queries is None:
            raise UserInputError(
                f"press '{self.name}' scores with the model's queries, which it takes from transformers' "
                f"AttentionInterface, but {type(module).__name__} did not call it; use streaming_llm, knorm or kivi"
            )
        self.observe(module, layer, queries, index)
        n_new = layer.last_update
        before = layer.seen - n_new
        target = None
        if self._prompt_len is not None:
            target = self.target(index, self._prompt_len)
        elif n_new > 1 and (self._every_forward or before == 0):
            target = self.target(index, layer.seen)
        elif n_new == 1 and self.decodes and layer.budget is not None:
            target = layer.budget
        if target is None:
            return
        if n_new > 1:  # a decode step adds one token a layer; counting every layer each step would cost O(layers²)
            self.peak_cache_bytes = max(self.peak_cache_bytes, cache_bytes(cache))
        self.compress_layer(module, layer, queries, index, target)
        if layer.budget is None or self._prompt_len is not None or self._every_forward:
            layer.budget = target

    def make_layer(self, old, index: int):
        """The cache layer this press needs in place of `old` (a transformers DynamicLayer)."""
        return self.layer_class.adopt(old)

    # ---- lifetime

    def attach(self, model, state: RuntimeState | None = None) -> None:
        if getattr(model, _MODEL_ATTR, None) is not None:
            raise UserInputError(
                f"a KV press ('{getattr(model, _MODEL_ATTR).name}') is already attached to this model; detach it first "
                "(one KV stage per model)"
            )
        self.state = state if state is not None else RuntimeState()
        self.load_state(self.state)
        adapter = ModelAdapter(model)
        modules = list(adapter.attention_modules().values())
        if not modules:
            raise UserInputError(f"found no attention modules in {type(model).__name__}; KV presses need them")
        configs = _configs(model)
        inner = _inner_name(modules[0])
        if inner not in ("sdpa", "eager", ATTENTION_IMPL):
            raise UserInputError(
                f"KV presses run on 'sdpa' or 'eager' attention, the model uses '{inner}'; load it with "
                "attn_implementation='sdpa'"
            )
        name = _register_wrapper(inner)
        self._saved_impl = [(cfg, cfg._attn_implementation) for cfg in configs if hasattr(cfg, "_attn_implementation")]
        for cfg, _ in self._saved_impl:
            cfg._attn_implementation = name
        for i, module in enumerate(modules):
            index = getattr(module, "layer_idx", i)
            module._sparseforge_kv_hook = _ModuleHook(self, index if isinstance(index, int) else i, _inner_function(module, inner))
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._hooks.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
        self._modules = modules
        self._model_ref = weakref.ref(model)
        setattr(model, _MODEL_ATTR, self)

    def detach(self, model) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for module in self._modules:
            if hasattr(module, "_sparseforge_kv_hook"):
                del module._sparseforge_kv_hook
        self._modules = []
        for cfg, impl in self._saved_impl:
            cfg._attn_implementation = impl
        self._saved_impl = []
        if getattr(model, _MODEL_ATTR, None) is self:
            delattr(model, _MODEL_ATTR)
        self._model_ref = None

    def load_state(self, state: RuntimeState) -> None:
        """Read what `calibrate` produced (per-head flags, ...). Default: nothing."""

    def report(self, state: RuntimeState) -> dict:
        """Stage-report fields: which modes this press compresses in (docs/methods/kv.md)."""
        return {"compresses_while_decoding": bool(self.decodes), "chunked_prefill": bool(self.chunks)}

    @contextlib.contextmanager
    def schedule(self, every_forward: bool = False, prompt_len: int | None = None):
        """Compress every multi-token forward to the ratio (`every_forward`), or every forward to the budget of a
        `prompt_len`-token prompt (chunked prefill). Restores the default schedule on exit."""
        previous = (self._every_forward, self._prompt_len)
        self._every_forward, self._prompt_len = every_forward, prompt_len
        try:
            yield self
        finally:
            self._every_forward, self._prompt_len = previous

    # ---- hooks

    def _pre_hook(self, module, args, kwargs):
        hook = module._sparseforge_kv_hook
        hook.queries = None
        cache = find_cache(args, kwargs)
        hook.layer = None
        if cache is None:
            return None
        layers = cache.layers
        if getattr(cache, "layer_class_to_replicate", None) is not None:
            while len(layers) <= hook.index:
                layers.append(cache.layer_class_to_replicate())
        if hook.index >= len(layers):
            return None
        layer = layers[hook.index]
        if isinstance(layer, DynamicSlidingWindowLayer) or not isinstance(layer, DynamicLayer):
            return None  # sliding-window layers already bound their memory; other kinds are left alone
        if type(layer) is DynamicLayer:
            layer = self.make_layer(layer, hook.index)
            layers[hook.index] = layer
        hook.layer = layer
        return None

    def _post_hook(self, module, args, kwargs, output):
        hook = module._sparseforge_kv_hook
        layer, queries = hook.layer, hook.queries
        hook.layer = hook.queries = None
        if layer is not None:
            with torch.no_grad():
                self.after_forward(module, layer, queries, hook.index, find_cache(args, kwargs))
        return None


def attached_press(model) -> KVPress | None:
    """The KV press attached to `model`, if any."""
    return getattr(model, _MODEL_ATTR, None)


def recent_bonus(held: int, recent: int, device) -> torch.Tensor:
    """+inf for the last `recent` held tokens (always kept), 0 elsewhere: `[held]`."""
    bonus = torch.zeros(held, device=device)
    if recent > 0:
        bonus[max(0, held - recent):] = math.inf
    return bonus
