"""Shared machinery of the sparse-attention family: one attention implementation registered through
`transformers.AttentionInterface`, the per-module hook it dispatches through, and the small bases of the two
kinds of method.

How it acts on a running model (generic, no per-model code):

* `attach` registers `sparseforge_attn:sdpa` (attention function `sparse_attention_forward`, mask function of
  `sdpa`) and points the model's configs at it, so every attention module of every architecture whose attention
  goes through the interface calls it with the query, key and value the model computed (after q-norm and rotary).
  When a KV press is attached already, the press's wrapper (`sparseforge_kv:sdpa`) stays the outer one and this
  function becomes the inner implementation it calls, so the press still sees the queries and its cache; a press
  attached later wraps `sparseforge_attn:sdpa` the same way. Either order gives the same chain.
* Each attention module gets a `_AttentionHook` with two slots: a **prefill** method (a prompt from an empty
  cache: queries and keys of one length) and a **decode** method (one query over the cache). Whatever a slot does
  not handle (padding masks, sliding windows, soft-capping, attention sinks, dropout, chunked prefill, an empty
  slot, or the speed gate saying dense) runs in the model's own implementation, unchanged.
* A forward pre-hook and hook on each attention module check that the function was really called: a model whose
  attention does not go through the interface raises a one-line `UserInputError` on its first forward instead of
  running dense while claiming to be sparse.
* `detach` restores the previous implementation names (or the press's inner function) and removes every hook, so
  the outputs are bit-identical to before.

Sparse attention needs the model loaded with `attn_implementation="sdpa"` (the transformers default): the eager
path always materialises a mask, which would hide from the hook whether a batch is padded.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.errors import UserInputError
from sparseforge.kernels.block_sparse_attention import (AttentionGate, BlockSelection, block_sparse_attention,
                                                         crossover_table, num_blocks)
from sparseforge.methods.base import RuntimeMethod, RuntimeState, param

try:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError as exc:  # pragma: no cover - transformers 5 is a dependency
    raise ImportError("sparseforge.methods.attention needs transformers >= 5 (AttentionInterface)") from exc

ATTENTION_NAME = "sparseforge_attn:sdpa"
KV_WRAPPER = "sparseforge_kv:sdpa"
_HOOK_ATTR = "_sparseforge_attn_hook"
_MODEL_ATTR = "_sparseforge_attn_install"
# Keyword arguments that change attention beyond a causal softmax; when present and set, the model's own
# implementation runs (dense).
_SPECIAL_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks")


@dataclasses.dataclass
class _AttentionHook:
    index: int
    inner: Any  # the function the model (or the KV wrapper) would have called
    prefill: "SparsePrefill | None" = None
    decode: "SparseDecode | None" = None
    called: bool = False

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        self.called = True
        out = None
        plain = attention_mask is None and not any(kwargs.get(k) is not None for k in _SPECIAL_KWARGS)
        window = kwargs.get("sliding_window")
        if attention_mask is None and window is not None and key.shape[2] <= window:
            plain = not any(kwargs.get(k) is not None for k in _SPECIAL_KWARGS if k != "sliding_window")  # window spans all
        # Dropout, a position bias or a non-causal module (an encoder) also go to the model's implementation.
        plain = plain and not kwargs.get("dropout") and kwargs.get("position_bias") is None
        plain = plain and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
        if plain:
            scale = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            with torch.no_grad():
                if self.prefill is not None and query.shape[2] == key.shape[2] and query.shape[2] > 1:
                    out = self.prefill.run_prefill(module, self.index, query, key, value, scale)
                elif self.decode is not None and query.shape[2] == 1:
                    out = self.decode.run_decode(module, self.index, query, key, value, scale)
        if out is None:
            return self.inner(module, query, key, value, attention_mask, **kwargs)
        return out.transpose(1, 2).contiguous(), None


def sparse_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: dispatch through the module's hook, or SDPA for a module without one."""
    hook: _AttentionHook | None = getattr(module, _HOOK_ATTR, None)
    if hook is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
    return hook.attend(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _configs(model) -> list:
    root = getattr(model, "config", None)
    found = [root] if root is not None else []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and all(cfg is not c for c in found):
            found.append(cfg)
    return [c for c in found if hasattr(c, "_attn_implementation")]


@dataclasses.dataclass
class _Install:
    """What the first attention stage changed on a model, undone when the last one detaches."""

    modules: list
    handles: list
    saved_impl: list  # (config, name) pairs changed to ATTENTION_NAME
    saved_kv_inner: list  # (KV module hook, its inner) pairs whose inner became sparse_attention_forward


def _install(model) -> _Install:
    modules = list(ModelAdapter(model).attention_modules().values())
    if not modules:
        raise UserInputError(f"found no attention modules in {type(model).__name__}; sparse attention needs them")
    current = getattr(getattr(modules[0], "config", None), "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", KV_WRAPPER):
        raise UserInputError(
            f"sparse attention runs on 'sdpa' attention, the model uses '{current}'; load it with attn_implementation='sdpa'"
        )
    _register()
    install = _Install(modules, [], [], [])
    for i, module in enumerate(modules):
        index = getattr(module, "layer_idx", i)
        index = index if isinstance(index, int) else i
        kv_hook = getattr(module, "_sparseforge_kv_hook", None)
        if current == KV_WRAPPER and kv_hook is not None:
            # A press is attached: it stays outermost and calls us instead of SDPA.
            hook = _AttentionHook(index, kv_hook.inner)
            install.saved_kv_inner.append((kv_hook, kv_hook.inner))
            kv_hook.inner = sparse_attention_forward
        else:
            hook = _AttentionHook(index, ALL_ATTENTION_FUNCTIONS["sdpa"])
        setattr(module, _HOOK_ATTR, hook)
        install.handles.append(module.register_forward_pre_hook(_pre_check))
        install.handles.append(module.register_forward_hook(_post_check))
    if current == "sdpa":
        install.saved_impl = [(cfg, cfg._attn_implementation) for cfg in _configs(model)]
        for cfg, _ in install.saved_impl:
            cfg._attn_implementation = ATTENTION_NAME
    setattr(model, _MODEL_ATTR, install)
    return install


def _uninstall(model, install: _Install) -> None:
    for handle in install.handles:
        handle.remove()
    for module in install.modules:
        if hasattr(module, _HOOK_ATTR):
            delattr(module, _HOOK_ATTR)
    for cfg, name in install.saved_impl:
        cfg._attn_implementation = name
    for kv_hook, inner in install.saved_kv_inner:
        kv_hook.inner = inner
    if getattr(model, _MODEL_ATTR, None) is install:
        delattr(model, _MODEL_ATTR)


def _pre_check(module, args):
    getattr(module, _HOOK_ATTR).called = False


def _post_check(module, args, output):
    hook = getattr(module, _HOOK_ATTR)
    if not hook.called:
        raise UserInputError(
            f"{type(module).__name__} did not call transformers' AttentionInterface, so sparse attention cannot act on "
            "it; detach the attention stage for this architecture"
        )


# ----------------------------------------------------------------------------- method bases


class SparseAttention(RuntimeMethod):
    """Base of the family: attaches into one slot (`slot`: "prefill" or "decode") of every attention module's hook,
    installing the hook if no other attention stage did."""

    family: ClassVar[str] = "attention"
    slot: ClassVar[str] = "prefill"

    def __init__(self, params=None):
        super().__init__(params)
        self.state = RuntimeState()
        self._model_ref = None

    def attach(self, model, state: RuntimeState | None = None) -> None:
        self.state = state if state is not None else RuntimeState()
        self.load_state(self.state)
        install = getattr(model, _MODEL_ATTR, None) or _install(model)
        hooks = [getattr(m, _HOOK_ATTR) for m in install.modules]
        taken = getattr(hooks[0], self.slot)
        if taken is not None:
            raise UserInputError(
                f"a {self.slot} attention method ('{taken.name}') is already attached; detach it first (one per slot)"
            )
        for hook in hooks:
            setattr(hook, self.slot, self)

    def detach(self, model) -> None:
        install = getattr(model, _MODEL_ATTR, None)
        if install is None:
            return
        hooks = [getattr(m, _HOOK_ATTR) for m in install.modules]
        for hook in hooks:
            if getattr(hook, self.slot) is self:
                setattr(hook, self.slot, None)
        if all(h.prefill is None and h.decode is None for h in hooks):
            _uninstall(model, install)

    def load_state(self, state: RuntimeState) -> None:
        """Read what `calibrate` produced. Default: nothing."""


@dataclasses.dataclass
class PrefillParams:
    block_size: int = param(64, "tokens per query and key block (the unit of selection)")
    gate: str = param("auto", "auto: sparse only from the measured crossover length and density on (else SDPA); always: sparse at every length (quality measurements)", ("auto", "always"))
    kernel: str = param("flex", "block-sparse kernel: gather (chosen key blocks into SDPA; no compiler), flex (compiled FlexAttention: the faster on CPU, the only one the gate sends work to), masked (the selection as a dense mask: measurements only, never faster)", ("gather", "flex", "masked"))


def check_int(value, where: str, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"{where}{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(value, where: str, name: str, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    if not ok:
        raise UserInputError(f"{where}{name} must lie in (0, 1], got {value!r}")


def prefix(where: str) -> str:
    return where if not where or where.endswith(": ") else f"{where}: "


class SparsePrefill(SparseAttention):
    """A prefill pattern implements `select(q, k, scale, heads)`: the key blocks each query block of the given
    query heads attends (`BlockSelection` over `len(heads)` heads). Gating, the diagonal, statistics and the
    block-sparse computation are shared here."""

    Params: ClassVar[type] = PrefillParams
    slot: ClassVar[str] = "prefill"

    def __init__(self, params=None):
        super().__init__(params)
        self.gate = AttentionGate(crossover_table("cpu", self.params.kernel))  # saved in the state by calibrate
        self.stats: dict[int, dict[str, float]] = {}  # per layer: density and path of the last prefill
        self.record = True

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        check_int(params.block_size, prefix(where), "block_size", minimum=8)

    def calibrate(self, model, context) -> RuntimeState:
        return RuntimeState(data={"gate": self.gate.to_json()})

    def load_state(self, state: RuntimeState) -> None:
        if "gate" in state.data:
            self.gate = AttentionGate.from_json(state.data["gate"])

    def select(self, q: torch.Tensor, k: torch.Tensor, scale: float, heads: torch.Tensor, index: int) -> BlockSelection:
        raise NotImplementedError

    def selection(self, q, k, scale, index: int = 0) -> BlockSelection:
        """The selection for every query head of one layer, diagonal blocks included."""
        heads = torch.arange(q.shape[1], device=q.device)
        sel = self.select(q, k, scale, heads, index)
        return with_diagonal(sel)

    def predicted_density(self, q, k, scale, heads: torch.Tensor, index: int) -> torch.Tensor | None:
        """Per head of `heads` (`[len(heads)]`), a cheap estimate of the density `select` would reach, computed
        before its index and far cheaper than it; None: no estimate, the index decides. The speed gate sends a
        prompt to SDPA when the layer's mean estimate already exceeds what it allows, so the index of a prompt
        that would run dense anyway is never built."""
        return None

    def run_prefill(self, module, index: int, q, k, v, scale):
        length = q.shape[2]
        forced = self.params.gate == "always"
        # The saved table was measured on CPU; other devices use theirs (none measured yet: dense).
        gate = self.gate if q.device.type == "cpu" else AttentionGate(crossover_table(q.device.type, self.params.kernel))
        if not forced:
            if length < gate.min_tokens() or not gate.sparse_wins(length, 0.0):
                self._note(index, length, None, "sdpa")
                return None
            guess = self.predicted_density(q, k, scale, torch.arange(q.shape[1], device=q.device), index)
            if guess is not None and not gate.sparse_wins(length, float(guess.mean())):
                self._note(index, length, None, "sdpa", float(guess.mean()))
                return None
        sel = self.selection(q, k, scale, index)
        density = sel.density()
        if not forced and not gate.sparse_wins(length, density):
            self._note(index, length, density, "sdpa")
            return None
        self._note(index, length, density, "sparse")
        return block_sparse_attention(q, k, v, sel, scale, self.params.kernel)

    def _note(self, index, length, density, path, predicted=None) -> None:
        # density: of the built selection (None where the gate decided before building it); predicted: the
        # estimate that made the gate say dense without an index.
        if self.record:
            self.stats[index] = {"length": length, "density": density, "path": path, "predicted": predicted}

    def report(self, state: RuntimeState) -> dict:
        return {"slot": self.slot, "gate": self.params.gate, "kernel": self.params.kernel, "block_size": self.params.block_size}


class SparseDecode(SparseAttention):
    """A decode method implements `run_decode(module, index, q, k, v, scale)` for one query over the cache."""

    slot: ClassVar[str] = "decode"

    def run_decode(self, module, index: int, q, k, v, scale):
        raise NotImplementedError


# ----------------------------------------------------------------------------- selection helpers


def with_diagonal(sel: BlockSelection) -> BlockSelection:
    """`sel` with each query block's own (diagonal) block added where missing, so no query row is empty."""
    b, h, n, w = sel.kv_index.shape
    diag = torch.arange(n, device=sel.kv_index.device)
    valid = torch.arange(w, device=diag.device) < sel.kv_count[..., None]
    has = ((sel.kv_index == diag[:, None]) & valid).any(-1)  # [b, h, n]
    if bool(has.all()):
        return sel
    index = torch.cat([sel.kv_index, torch.zeros(b, h, n, 1, dtype=sel.kv_index.dtype, device=diag.device)], -1)
    pos = sel.kv_count.clamp(max=w)
    index.scatter_(3, pos[..., None], diag.expand(b, h, n)[..., None])
    count = sel.kv_count + (~has).long()
    # Where the diagonal was already there the written entry lies past the count: padding, ignored.
    return BlockSelection(index, count, sel.block, sel.length)


def kv_heads_of(heads: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
    return heads // (q_heads // kv_heads)


def last_query_probs(q: torch.Tensor, k: torch.Tensor, scale: float, heads: torch.Tensor, window: int) -> torch.Tensor:
    """Attention probabilities of the last `window` queries of heads `heads` over every key, causal:
    `[b, len(heads), window, L]` float32, one KV head group at a time (no copy of the keys per query head)."""
    b, hq, L, d = q.shape
    window = min(window, L)
    kvh = kv_heads_of(heads, hq, k.shape[1])
    out = torch.empty(b, len(heads), window, L, dtype=torch.float32, device=q.device)
    # Only the last `window` keys can lie in a last query's future.
    future = torch.ones(window, window, dtype=torch.bool, device=q.device).triu(1)
    for g in torch.unique(kvh).tolist():
        rows = (kvh == g).nonzero().flatten()
        ql = q[:, heads[rows], L - window:].float()  # [b, r, w, d]
        # One GEMM per KV head: the group's query rows stacked against that head's keys.
        scores = (ql.reshape(b, -1, d) @ k[:, g].float().transpose(-1, -2)).view(b, len(rows), window, L) * scale
        scores[..., L - window:].masked_fill_(future, float("-inf"))
        out[:, rows] = scores.softmax(-1)
    return out


def pooled_query_columns(q: torch.Tensor, k: torch.Tensor, scale: float, heads: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """The attention of one pooled query per head (the mean of the last `window` queries) over the keys, summed
    per key block: `[b, len(heads), n]`. A cheap stand-in for `last_query_probs` (one query row per head instead of
    `window`), used to predict a pattern's density before its index is built."""
    b, hq, L, d = q.shape
    window = min(window, L)
    kvh = kv_heads_of(heads, hq, k.shape[1])
    qm = q[:, heads, L - window:].float().mean(2)  # [b, h, d]
    scores = torch.empty(b, len(heads), L, dtype=torch.float32, device=q.device)
    for g in torch.unique(kvh).tolist():  # one small GEMM per KV head, no copy of the keys per query head
        rows = (kvh == g).nonzero().flatten()
        scores[:, rows] = qm[:, rows] @ k[:, g].float().transpose(-1, -2)
    probs = (scores * scale).softmax(-1)
    n = num_blocks(L, block)
    return torch.nn.functional.pad(probs, (0, n * block - L)).view(b, len(heads), n, block).sum(-1)


def block_density(mask: torch.Tensor) -> torch.Tensor:
    """Density of a `[..., n, n]` block mask as `BlockSelection.from_block_mask` would keep it (causal part, the
    diagonal added), per leading index, float64."""
    n = mask.shape[-1]
    keep = (mask | torch.eye(n, dtype=torch.bool, device=mask.device)) & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return keep.sum((-1, -2)).double().cpu() / (n * (n + 1) / 2)


def pooled(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of `block` positions: `[b, h, L, d]` -> `[b, h, n, d]` (a short last block averages
    only its own positions)."""
    b, h, L, d = x.shape
    n = num_blocks(L, block)
    pad = n * block - L
    x = x.float()
    xs = (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x).view(b, h, n, block, d).sum(3)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = block - pad
    return xs / counts[:, None]


def selection_coverage(q, k, sel: BlockSelection, scale: float) -> torch.Tensor:
    """Share of the dense causal attention mass that falls inside the selected blocks, averaged over query
    positions: `[b, hq]`. One query block at a time (the full score matrix of a head is never held)."""
    b, hq, L, d = q.shape
    group = hq // k.shape[1]
    bs = sel.block
    mask = sel.block_mask()  # [b, hq, n, n]
    keys = k.float().repeat_interleave(group, 1)
    kpos = torch.arange(L, device=q.device)
    total = torch.zeros(b, hq, dtype=torch.float64, device=q.device)
    for i in range(sel.q_blocks):
        lo, hi = i * bs, min(L, (i + 1) * bs)
        s = q[:, :, lo:hi].float() @ keys.transpose(-1, -2) * scale
        qpos = torch.arange(lo, hi, device=q.device)
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        p = s.softmax(-1)  # [b, hq, rows, L]
        inside = mask[:, :, i][:, :, kpos // bs]  # [b, hq, L]
        total += (p * inside[:, :, None, :]).sum((-1, -2)).double()
    return (total / L).float()
