"""Sparse attention: prefill patterns (A-shape, vertical-slash, FlexPrefill, an offline per-head search) and Quest
decode selection, through one implementation registered with `transformers.AttentionInterface`.

    from sparseforge.methods import get_method
    cls = get_method("vertical-slash")
    method = cls(cls.parse_params({"vertical": 1024, "slash": 2048}))
    method.attach(model, method.calibrate(model, context))   # prefill of long prompts runs block-sparse
    method.stats            # per layer: length, density, path ("sparse" or "sdpa") of the last prefill
    method.detach(model)    # outputs bit-identical to before

Registered methods (family "attention", lifetime "runtime"): ashape, vertical-slash, flexprefill,
minference-search (prefill slot) and quest (decode slot); one prefill and one decode method can be attached together,
and with a KV press. Kernels: `sparseforge.kernels.block_sparse_attention`. Docs: docs/methods/attention.md.
"""
from sparseforge.methods.attention import ashape, flexprefill, quest, search, vertical_slash  # noqa: F401
from sparseforge.methods.attention.base import (ATTENTION_NAME, SparseAttention, SparseDecode, SparsePrefill,
                                                selection_coverage, sparse_attention_forward)

__all__ = ["ATTENTION_NAME", "SparseAttention", "SparseDecode", "SparsePrefill", "selection_coverage",
           "sparse_attention_forward"]
