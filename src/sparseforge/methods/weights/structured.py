"""Structured pruning: remove whole MLP channels and whole attention heads, so the result is a smaller dense
model (narrower matrices, updated config) that plain transformers loads and runs faster without any kernel.

A channel j of the MLP is row j of every input projection (gate/up, fc1, c_fc, ...) and column j of the output
projection (down, fc2, c_proj, ...); a head is its rows of q (and of k/v when a whole KV group goes) and its
columns of the attention output projection. Importance is read at the output projection, where a channel or
head meets the residual stream:
- score "activation": ||x_j||_2 over the calibration tokens times ||W_out[:, j]||_2 (a head sums its columns);
- score "magnitude": ||W_out[:, j]||_2 only (no calibration data).

Hugging Face configs hold one intermediate size and one head count for all layers, so every layer loses the
same number of channels and heads; which ones is decided per layer. With grouped-query attention the same
number of query heads goes from every KV group (see `core.masks.HeadPlan`), and head_dim never changes.

Which projections are the MLP's inputs and output and attention's q, k, v and o, and the head geometry, come
from the adapter (`ModelAdapter.mlp_layout` / `attention_layout`); this file checks that they are separate
plain layers of the shapes its cuts assume. Replacing the cut layers goes through core.surgery.

The layer walk (core.calibration.run_layerwise) first zeroes the chosen columns, which is exactly what
removal computes, so later layers calibrate on the pruned model's activations; the matrices are cut and the
config rewritten after the walk. Before touching the model, the new config is round-tripped through its dict
(the checks from_pretrained runs), instantiated on the meta device, and its shapes compared with the cut ones:
an architecture whose config cannot express the result is refused up front (fused qkv or gate_up weights,
expert stacks; OPT derives head_dim from hidden_size / heads; transformers 5 Llama and Gemma2 configs want
the head count to divide hidden_size).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from sparseforge.core.adapter import HEAD_COUNT_KEYS, KV_HEAD_COUNT_KEYS, MLP_OUTPUT_NAMES, Conv1D, ModelAdapter, Projection
from sparseforge.core.calibration import CalibrationConfig, InputStats, calibration_batches, run_layerwise
from sparseforge.core.masks import HeadPlan, channel_weight_mask, drop_lowest, head_mask, prune_count
from sparseforge.core.offload import offload_store
from sparseforge.core.surgery import replace_module, replace_parameter
from sparseforge.errors import UserInputError
from sparseforge.methods.base import Method, param, register
from sparseforge.methods.weights.base import StageResult

# Config fields of the MLP width, tried in order (the head-count fields come with the adapter).
_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff")
_FALLBACK = "use unstructured or N:M pruning instead (e.g. preset wanda-50 or wanda-2of4)"


@dataclasses.dataclass
class StructuredParams:
    mlp_sparsity: float = param(0.25, "fraction of MLP intermediate channels removed, the same count in every layer, in [0, 1)")
    head_sparsity: float = param(0.0, "fraction of attention query heads removed, the same count in every layer (GQA: per KV group), in [0, 1)")
    score: str = param("activation", "importance: 'activation' (||x_j|| x output-projection column norm, calibrated) or 'magnitude' (column norm)", ("activation", "magnitude"))
    channel_multiple: int = param(1, "round the kept MLP width down to a multiple of this (e.g. 64, which matmul kernels like)")


@dataclasses.dataclass
class StructuredResult(StageResult):
    """A StageResult plus what was removed: widths and head counts before/after, the removed channel and head
    indices per layer (in the original numbering), parameter counts and the config fields rewritten."""

    removed: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Layout:
    """Names of the resized parts, relative to a decoder layer (the same in every layer)."""

    mlp_in: list[str]
    mlp_out: str | None
    attn: str | None  # the attention module
    q: str | None
    k: str | None
    v: str | None
    o: str | None
    head_params: dict[str, str]  # other attention parameters -> how they are cut: "q_elem", "kv_elem", "q_head", "kv_head" or "" (kept)


@dataclasses.dataclass
class _Plan:
    layout: _Layout
    width: int  # MLP channels before
    channels_removed: int
    heads: HeadPlan | None
    head_dim: int
    config_changes: dict[str, list]  # field -> [before, after]
    fresh: nn.Module  # the model built from the new config on the meta device


def _unsupported(model, what: str, reason: str, knob: str) -> UserInputError:
    return UserInputError(
        f"structured pruning cannot remove {what} from {type(model).__name__} ({reason}); "
        f"set {knob}: 0 to leave them, or {_FALLBACK}"
    )


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _plain(model, proj: Projection, what: str, knob: str) -> None:
    if type(proj.module) is not nn.Linear and not (Conv1D and isinstance(proj.module, Conv1D)):
        raise _unsupported(model, what, f"'{proj.name}' is a {type(proj.module).__name__}, not nn.Linear or Conv1D", knob)


def _find_layout(model, adapter: ModelAdapter, index: int, need_mlp: bool, need_heads: bool) -> tuple[_Layout, int, int]:
    """Check that decoder layer `index` has the parts this method cuts, as the adapter finds them (separate
    plain projections of the shapes the config implies); returns the layout, MLP width and head_dim."""
    projs = adapter.projections(index)
    attention, mlp = adapter.attention_layout(index), adapter.mlp_layout(index)
    layout = _Layout([], None, attention.module, None, None, None, None, {})
    width = head_dim = 0

    if need_mlp:
        knob, what = "mlp_sparsity", "MLP channels"
        if mlp.experts:
            raise _unsupported(model, what, "its MLP is a mixture of experts with fused expert weights", knob)
        if mlp.output is None:
            raise _unsupported(model, what, f"found {len(mlp.output_candidates)} MLP output projections named like {', '.join(MLP_OUTPUT_NAMES)}, need one", knob)
        width, hidden = mlp.width, mlp.hidden
        for r in mlp.inputs:
            p = projs[mlp.qualified(r)]
            if (p.in_features, p.out_features) != (hidden, width):
                raise _unsupported(model, what, f"'{r}' ({p.out_features}x{p.in_features}) is not a separate input projection of the {width} channels; a fused gate/up weight?", knob)
        if not mlp.inputs:
            raise _unsupported(model, what, f"found no MLP input projection feeding '{mlp.output}'", knob)
        for r in (*mlp.inputs, mlp.output):
            _plain(model, projs[mlp.qualified(r)], what, knob)
        layout.mlp_in, layout.mlp_out = list(mlp.inputs), mlp.output

    if need_heads:
        knob, what = "head_sparsity", "attention heads"
        if attention.module is None:
            raise _unsupported(model, what, "found no attention module (self_attn, attn, attention)", knob)
        if not attention.separate_qkv:
            names = ", ".join(_leaf(r) for r in attention.projections)
            raise _unsupported(model, what, f"its attention holds {names}: query, key and value are not separate projections (fused qkv?)", knob)
        q, k, v, o = attention.q, attention.k, attention.v, attention.o
        qp, kp, vp, op = (projs[attention.qualified(r)] for r in (q, k, v, o))
        for p in (qp, kp, vp, op):
            _plain(model, p, what, knob)
        heads, kv, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        if (qp.out_features, kp.out_features, vp.out_features, op.in_features) != (heads * head_dim, kv * head_dim, kv * head_dim, heads * head_dim):
            raise _unsupported(model, what, f"q/k/v/o shapes do not match {heads} heads and {kv} KV heads from its config", knob)
        layout.q, layout.k, layout.v, layout.o = q, k, v, o
        # Other parameters of the attention module (norms, sinks) may be per head; `_plan` tells which from
        # the shapes the updated config builds, since sizes alone are ambiguous (head_dim can equal heads).
        attn_mod = adapter.layers[index].get_submodule(attention.module)
        proj_mods = {id(projs[attention.qualified(r)].module) for r in attention.projections}
        for name, mod in attn_mod.named_modules():
            if id(mod) not in proj_mods:
                for pname, _ in mod.named_parameters(recurse=False):
                    layout.head_params[f"{name}.{pname}" if name else pname] = ""
    return layout, width, head_dim


def _config_field(config, keys, value, allow_none: bool = False) -> str | None:
    for k in keys:
        if getattr(config, k, None) == value:
            return k
    if allow_none:  # GPT-2's n_inner: None means 4 x hidden
        for k in keys:
            if hasattr(config, k) and getattr(config, k) is None:
                return k
    return None


def _updated(config, changes: dict[str, list]):
    new = copy.deepcopy(config)
    for key, (_, after) in changes.items():
        setattr(new, key, after)
    return new


def _first_line(exc: BaseException) -> str:
    exc = exc.__cause__ or exc  # transformers wraps its config checks in a validation error
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _config_problem(config) -> str | None:
    """Why the config would not load back (None if it would): a round trip through its dict runs the same
    checks as from_pretrained (transformers 5 refuses e.g. Llama and Gemma2 heads that do not divide hidden_size)."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception as exc:
        return _first_line(exc)
    return None


def _accepted_head_fractions(config, changes: dict[str, list], heads: int, kv: int) -> list[str]:
    """Head sparsities (one head per group, one whole group, ...) whose head counts the config accepts."""
    group = heads // kv
    fractions = sorted({k / group for k in range(1, group)} | {k / kv for k in range(1, kv)})
    ok = []
    for f in fractions:
        plan = HeadPlan.make(heads, kv, f)
        trial = {**changes, _config_field(config, HEAD_COUNT_KEYS, heads): [heads, plan.heads_after]}
        kv_key = next((k for k in KV_HEAD_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
        if kv_key:
            trial[kv_key] = [kv, plan.kv_heads_after]
        if _config_problem(_updated(config, trial)) is None:
            ok.append(f"{f:g} ({plan.heads_after} head{'s' if plan.heads_after > 1 else ''})")
    return ok[:4]


def _shape_after(shape: tuple, kind: str, rows: int | None, cols: int | None, is_bias: bool) -> tuple:
    """The shape of a projection's weight or bias after keeping `rows` outputs and `cols` inputs."""
    if is_bias:
        return (rows,) if rows is not None else shape
    out_f, in_f = (shape[1], shape[0]) if kind == "conv1d" else shape
    out_f, in_f = rows or out_f, cols or in_f
    return (in_f, out_f) if kind == "conv1d" else (out_f, in_f)


def _plan(model, params: StructuredParams) -> _Plan:
    """Everything decided from the config and shapes alone, checked before the model is touched."""
    adapter = ModelAdapter(model)
    config = model.config
    need_mlp, need_heads = params.mlp_sparsity > 0, params.head_sparsity > 0
    heads, kv = adapter.head_counts()
    kv_key = next((k for k in KV_HEAD_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    if need_heads and heads is None:
        raise _unsupported(model, "attention heads", f"its config has none of {', '.join(HEAD_COUNT_KEYS)}", "head_sparsity")
    layout, width, head_dim = _find_layout(model, adapter, 0, need_mlp, need_heads)
    for i in range(1, adapter.num_layers):
        if _find_layout(model, adapter, i, need_mlp, need_heads) != (layout, width, head_dim):
            raise _unsupported(model, "channels or heads", f"decoder layer {i} is laid out unlike layer 0", "mlp_sparsity/head_sparsity")

    changes: dict[str, list] = {}
    channels_removed = 0
    if need_mlp:
        kept = (width - prune_count(width, params.mlp_sparsity)) // params.channel_multiple * params.channel_multiple
        if kept < 1:
            raise UserInputError(f"mlp_sparsity {params.mlp_sparsity:g} with channel_multiple {params.channel_multiple} keeps no channel of {width}; lower one of them")
        if kept == width:
            raise UserInputError(f"mlp_sparsity {params.mlp_sparsity:g} removes no channel of {width}; raise it or set it to 0")
        channels_removed = width - kept
        key = _config_field(config, _WIDTH_KEYS, width, allow_none=True)
        if key is None:
            raise _unsupported(model, "MLP channels", f"its config has no MLP width field ({', '.join(_WIDTH_KEYS)}) equal to {width}", "mlp_sparsity")
        changes[key] = [getattr(config, key), kept]
    head_plan = None
    if need_heads:
        head_plan = HeadPlan.make(heads, kv, params.head_sparsity)
        changes[_config_field(config, HEAD_COUNT_KEYS, heads)] = [heads, head_plan.heads_after]
        if kv_key and head_plan.kv_heads_after != kv:
            changes[kv_key] = [kv, head_plan.kv_heads_after]
        # Written explicitly: many models derive head_dim (and their rotary size) as hidden_size / heads.
        changes["head_dim"] = [getattr(config, "head_dim", None), head_dim]

    new_config = _updated(config, changes)
    problem = _config_problem(new_config)
    if problem:
        knob = "head_sparsity" if need_heads else "mlp_sparsity"
        hint = ""
        if need_heads:
            ok = _accepted_head_fractions(config, changes, heads, kv)
            hint = f"; head_sparsity values it accepts: {', '.join(ok)}" if ok else "; it accepts no smaller head count"
        raise _unsupported(model, "attention heads" if need_heads else "MLP channels", f"its config refuses the new sizes: {problem.rstrip('.')}{hint}", knob)
    try:
        with torch.device("meta"):
            fresh = type(model)(new_config)
    except Exception as exc:  # the model's own checks, e.g. OPT's "embed_dim must be divisible by num_heads"
        knob = "head_sparsity" if need_heads else "mlp_sparsity"
        raise _unsupported(model, "attention heads" if need_heads else "MLP channels", f"its config cannot express the smaller shapes: {_first_line(exc)}", knob) from None

    # Shapes after cutting, compared with those the new config builds: anything the config cannot express
    # (or a part this method does not know to cut) shows up as a mismatch here.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    heads_after = head_plan.heads_after if head_plan else 0
    kv_after = head_plan.kv_heads_after if head_plan else 0
    cuts: dict[str, tuple[int | None, int | None]] = {}
    if need_mlp:
        cuts.update({r: (width - channels_removed, None) for r in layout.mlp_in})
        cuts[layout.mlp_out] = (None, width - channels_removed)
    if need_heads:
        cuts.update({layout.q: (heads_after * head_dim, None), layout.k: (kv_after * head_dim, None), layout.v: (kv_after * head_dim, None), layout.o: (None, heads_after * head_dim)})
    built = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    sizes = {}  # per-head parameter kind -> (size before, size after) of its first dimension
    if need_heads:
        sizes = {"q_elem": (heads * head_dim, heads_after * head_dim), "kv_elem": (kv * head_dim, kv_after * head_dim), "q_head": (heads, heads_after), "kv_head": (kv, kv_after)}
    for pname in layout.head_params:
        key = f"{adapter.layer_name(0)}.{layout.attn}.{pname}"
        cur, new = expected[key], built.get(key)
        if new is not None and new != cur:
            layout.head_params[pname] = next((kind for kind, (b, a) in sizes.items() if cur[0] == b and new[0] == a and cur[1:] == new[1:]), "")
    for i in range(adapter.num_layers):
        prefix = adapter.layer_name(i)
        projs = adapter.projections(i)
        for rel, (rows, cols) in cuts.items():
            proj = projs[f"{prefix}.{rel}"]
            key = f"{prefix}.{rel}"
            expected[f"{key}.weight"] = _shape_after(expected[f"{key}.weight"], proj.kind, rows, cols, False)
            if f"{key}.bias" in expected:
                expected[f"{key}.bias"] = _shape_after(expected[f"{key}.bias"], proj.kind, rows, cols, True)
        for pname, kind in layout.head_params.items():
            if kind:
                key = f"{prefix}.{layout.attn}.{pname}"
                expected[key] = (sizes[kind][1], *expected[key][1:])
    for key in sorted(set(built) | set(expected)):
        if built.get(key) != expected.get(key):
            knob = "head_sparsity" if need_heads and layout.attn and f".{layout.attn}." in key else "mlp_sparsity"
            what = "attention heads" if knob == "head_sparsity" else "MLP channels"
            raise _unsupported(model, what, f"its config cannot express the cut shapes: '{key}' would be {expected.get(key)}, the updated config builds {built.get(key)}", knob)
    return _Plan(layout, width, channels_removed, head_plan, head_dim, changes, fresh)


def _column_scores(proj: Projection, stats: InputStats | None) -> torch.Tensor:
    """Per input column j of an output projection: ||W[:, j]||_2, times ||x_j||_2 when calibrated."""
    score = proj.weight().float().norm(dim=0)
    return score * stats.col_norm.to(score.device) if stats is not None else score


def _zero_columns(proj: Projection, keep: torch.Tensor) -> None:
    w = proj.weight()
    proj.set_weight(w * channel_weight_mask(keep.to(w.device), w.shape, "in").to(w.dtype))


def _cut(layer: nn.Module, rel: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Replace a projection by a smaller one holding only output rows `rows` and input columns `cols`."""
    mod = layer.get_submodule(rel)
    conv = bool(Conv1D) and isinstance(mod, Conv1D)
    w = mod.weight.data.t() if conv else mod.weight.data  # [out, in]
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    bias = mod.bias
    if bias is not None and rows is not None:
        bias = nn.Parameter(bias.data.index_select(0, rows.to(bias.device)).contiguous(), requires_grad=bias.requires_grad)
    if conv:  # Conv1D keeps [in, out]; resized in place (nf/nx are its out/in sizes)
        mod.weight = nn.Parameter(w.t().contiguous(), requires_grad=mod.weight.requires_grad)
        mod.nf, mod.nx = w.shape
        if bias is not None:
            mod.bias = bias
        return
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=mod.weight.requires_grad)
    if bias is not None:
        new.bias = bias
    new.train(mod.training)
    replace_module(layer, rel, new)


def _shrink(model, plan: _Plan, removed_channels: list[list[int]], removed_heads: list[list[int]]) -> list[str]:
    """Cut every layer to the chosen channels and heads, rewrite the config, and copy the scalar attributes
    (num_key_value_groups, ...) of a freshly built model, so the in-memory model equals a reloaded one."""
    adapter = ModelAdapter(model)
    layout = plan.layout
    changed: list[str] = []
    hd = plan.head_dim
    for i, layer in enumerate(adapter.layers):
        prefix = adapter.layer_name(i)
        if plan.channels_removed:
            gone = set(removed_channels[i])
            keep = torch.tensor([j for j in range(plan.width) if j not in gone])
            for rel in layout.mlp_in:
                _cut(layer, rel, rows=keep)
            _cut(layer, layout.mlp_out, cols=keep)
            changed += [f"{prefix}.{r}" for r in (*layout.mlp_in, layout.mlp_out)]
        if plan.heads is not None:
            hp = plan.heads
            gone = set(removed_heads[i])
            keep_q = torch.tensor([h for h in range(hp.heads) if h not in gone])
            # A KV head stays while any query head of its group does (whole groups go together).
            keep_kv = torch.unique(keep_q // hp.group_size)
            q_elem = (keep_q[:, None] * hd + torch.arange(hd)).flatten()
            kv_elem = (keep_kv[:, None] * hd + torch.arange(hd)).flatten()
            _cut(layer, layout.q, rows=q_elem)
            _cut(layer, layout.k, rows=kv_elem)
            _cut(layer, layout.v, rows=kv_elem)
            _cut(layer, layout.o, cols=q_elem)
            changed += [f"{prefix}.{r}" for r in (layout.q, layout.k, layout.v, layout.o)]
            index = {"q_elem": q_elem, "kv_elem": kv_elem, "q_head": keep_q, "kv_head": keep_kv}
            attn = layer.get_submodule(layout.attn)
            for pname, kind in layout.head_params.items():
                if not kind:
                    continue
                p = attn.get_parameter(pname)
                replace_parameter(attn, pname, nn.Parameter(p.data.index_select(0, index[kind].to(p.device)).contiguous(), requires_grad=p.requires_grad))
    for key, (_, after) in plan.config_changes.items():
        setattr(model.config, key, after)  # in place: modules keep references to this config object
    fresh_layers = plan.fresh.get_submodule(adapter.layer_list_name)
    for layer, fresh_layer in zip(adapter.layers, fresh_layers):
        fresh_modules = dict(fresh_layer.named_modules())
        for name, mod in layer.named_modules():
            twin = fresh_modules.get(name)
            if twin is None:
                continue
            for attr, value in list(vars(mod).items()):
                other = vars(twin).get(attr)
                if not attr.startswith("_") and type(value) in (int, float) and type(other) is type(value) and other != value:
                    setattr(mod, attr, other)
    return changed


@register
class Structured(Method):
    name = "structured"
    family = "weights"
    summary = "remove whole MLP channels and attention heads (same count per layer): a smaller dense model with an updated config"
    Params = StructuredParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        for knob in ("mlp_sparsity", "head_sparsity"):
            value = getattr(params, knob)
            if not 0 <= value < 1:
                extra = " (1 would remove every channel or head)" if value == 1 else ""
                raise UserInputError(f"{where}{knob} {value:g} is outside [0, 1){extra}; use a fraction such as 0.25")
        if params.mlp_sparsity == 0 and params.head_sparsity == 0:
            raise UserInputError(f"{where}structured removes nothing with mlp_sparsity and head_sparsity both 0; set one above 0")
        if params.channel_multiple < 1:
            raise UserInputError(f"{where}channel_multiple {params.channel_multiple} must be >= 1 (1 means no rounding)")

    def apply(self, model, tokenizer=None, targets=("*",), ignore=(), calibration: CalibrationConfig | None = None, progress=True) -> StructuredResult:
        if list(targets) != ["*"] or list(ignore):
            raise UserInputError(
                "a structured stage acts on every decoder layer alike (the config holds one MLP width and head count); "
                "drop its 'targets' and 'ignore', and set mlp_sparsity or head_sparsity to 0 to leave a part alone"
            )
        if offload_store(model) is not None:
            raise UserInputError("structured pruning reshapes every layer at once and cannot run on a disk-offloaded model; "
                                 "load the model without offload")
        calibration = calibration or CalibrationConfig()
        plan = _plan(model, self.params)
        activation = self.params.score == "activation"
        if activation and tokenizer is None:
            raise UserInputError("score 'activation' calibrates on text and needs the model's tokenizer; pass one or use score: magnitude")
        adapter = ModelAdapter(model)
        layout, hp, hd = plan.layout, plan.heads, plan.head_dim
        outputs = [r for r in (layout.mlp_out if plan.channels_removed else None, layout.o if hp else None) if r]
        params_before = sum(p.numel() for p in model.parameters())
        removed_channels: list[list[int]] = []
        removed_heads: list[list[int]] = []

        def choose(index, layer, projections, stats):
            prefix = adapter.layer_name(index)
            if plan.channels_removed:
                name = f"{prefix}.{layout.mlp_out}"
                keep = drop_lowest(_column_scores(projections[name], stats.get(name)), plan.channels_removed)
                _zero_columns(projections[name], keep)
                removed_channels.append(torch.nonzero(~keep).flatten().tolist())
            if hp is not None:
                name = f"{prefix}.{layout.o}"
                keep = head_mask(_column_scores(projections[name], stats.get(name)).reshape(hp.heads, hd).sum(-1), hp)
                _zero_columns(projections[name], keep.repeat_interleave(hd))
                removed_heads.append(torch.nonzero(~keep).flatten().tolist())

        batches = calibration_batches(tokenizer, calibration) if activation else None
        globs = [f"{adapter.layer_list_name}.*.{r}" for r in outputs]
        run_layerwise(model, choose, globs, (), batches, ("col_norm",) if activation else (), calibration, progress, desc=self.name)
        changed = _shrink(model, plan, removed_channels, removed_heads)

        removed: dict = {"score": self.params.score, "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
                         "config": plan.config_changes}
        parts = []
        if plan.channels_removed:
            removed["mlp_channels"] = {"before": plan.width, "after": plan.width - plan.channels_removed, "removed": removed_channels}
            parts.append(f"channels@{self.params.mlp_sparsity:g}")
        if hp is not None:
            removed["attention_heads"] = {"before": hp.heads, "after": hp.heads_after, "kv_heads_before": hp.kv_heads, "kv_heads_after": hp.kv_heads_after,
                                          "head_dim": hd, "mode": hp.mode, "removed": removed_heads}
            parts.append(f"heads@{self.params.head_sparsity:g}")
        # No ':' in the pattern: artifact storage reads 'N:M' from it.
        return StructuredResult(self.name, "+".join(parts), "layer", changed, None, removed=removed)
