"""Kernel dispatch: swap a compressed model's linear projections for `SparseLinear` modules that multiply
through a sparse kernel where a measured speed gate says it pays, and swap them back."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.offload import offload_store
from sparseforge.core.surgery import replace_module
from sparseforge.errors import UserInputError
from sparseforge.kernels.base import SparseLinear, SpeedGate, get_kernel

DEFAULT_TOKEN_COUNTS = (1, 16, 128, 512)


def use_sparse_kernel(model: nn.Module, kernel: str, gate: SpeedGate | None = None, targets: Iterable[str] = ("*",),
                      ignore: Iterable[str] = (), token_counts: Iterable[int] = DEFAULT_TOKEN_COUNTS,
                      repeats: int = 10, warmup: int = 3) -> dict:
    """Replace every selected nn.Linear projection whose weight the kernel accepts by a `SparseLinear`.

    Without `gate`, one is measured now on the model's device and dtype, for the distinct kernel keys (shape,
    and for CSR the sparsity) of the selected weights at `token_counts`. Returns {"replaced": [...],
    "skipped": [...] (not an nn.Linear, or a weight the kernel cannot store), "gate": the gate}. Parameters
    are shared, not copied; where the gate picks dense the outputs are bit-identical to before."""
    spec = get_kernel(kernel)
    if offload_store(model) is not None:
        raise UserInputError("sparse kernels need the model in memory; load it without offload=... to run it")
    adapter = ModelAdapter(model)
    selected = adapter.select(targets, ignore)
    if not selected:
        raise UserInputError(f"targets {list(targets)} minus ignore {list(ignore)} match no projection")
    chosen, skipped = {}, []
    for name, proj in selected.items():
        if proj.kind != "linear" or type(proj.module) is not nn.Linear or not spec.accepts(proj.module.weight.data):
            skipped.append(name)
        else:
            chosen[name] = proj.module
    if gate is None:
        keys = sorted({spec.key(m.weight.data) for m in chosen.values()})
        gate = SpeedGate(kernel=spec.name)
        if keys:
            w = next(iter(chosen.values())).weight
            gate = SpeedGate.measure(spec, keys, token_counts, w.device, w.dtype, repeats, warmup)
    elif gate.kernel and gate.kernel != spec.name:
        raise UserInputError(f"the speed gate was measured for the '{gate.kernel}' kernel, not '{spec.name}'; measure one for '{spec.name}'")
    for name, module in chosen.items():
        replace_module(model, name, SparseLinear(module, spec, gate))
    return {"replaced": list(chosen), "skipped": skipped, "gate": gate}


def restore_dense(model: nn.Module) -> int:
    """Swap every `SparseLinear` back to a plain nn.Linear sharing its parameters; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            replace_module(model, name, linear)
            swapped += 1
    return swapped
