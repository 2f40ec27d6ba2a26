"""The lincomp IR: ``lower(spec) -> Lowered``, the one description every backend and tool reads.

- :mod:`lincomp.ir.lowered`: ``lower``, ``Lowered`` (rule + printers, reach, tensors, algorithm, block plan).
- :mod:`lincomp.ir.rule`: the window rule as an expression tree; torch / FlexAttention / Triton / TVM printers.
- :mod:`lincomp.ir.graph`: the op graph (networkx DAG), ``build_graph``, ``format_ir``, ``graph_to_spec``.
- :mod:`lincomp.ir.passes`: ``verify``, ``canonicalise``, ``plan``, ``lower_to_plan(spec, L, **hints) -> Plan``.
- :mod:`lincomp.ir.cost`: exact visible-pair counts, FLOP / byte estimates, block-plan efficiency.
- :mod:`lincomp.ir.blocks`: the block-sparse tile plan of a window.
- :mod:`lincomp.ir.flex`: FlexAttention both ways: a spec's mask_mod / BlockMask, ``from_mask_mod(fn, L)``.
- :mod:`lincomp.ir.explain`: what ``lincomp explain`` prints (its command line: :mod:`lincomp.explain`).

Names load on first use, so ``from lincomp.ir.blocks import block_plan`` does not import networkx.
"""

import importlib

_LAZY = {
    "lower": "lowered", "Lowered": "lowered", "choose_algorithm": "lowered", "required_tensors": "tensors",
    "build_graph": "graph", "format_ir": "graph", "graph_to_spec": "graph", "TensorType": "graph",
    "verify": "passes", "canonicalise": "passes", "plan": "passes", "lower_to_plan": "passes",
    "Plan": "passes", "Rewrite": "passes", "PLAN_HINTS": "passes",
    "count_visible_pairs": "cost", "attention_flops": "cost", "dense_flops": "cost", "bytes_moved": "cost",
    "pair_efficiency": "cost", "estimate": "cost", "CostEstimate": "cost", "window_covers": "cost",
    "from_mask_mod": "flex", "block_mask": "flex",
    "block_plan": "blocks", "BlockPlan": "blocks", "default_tile": "blocks",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"lincomp.ir.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lincomp.ir' has no attribute {name!r}")


__all__ = list(_LAZY)
