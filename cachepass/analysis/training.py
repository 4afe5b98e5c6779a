"""Whether a graph runs train-time randomness: dropout that is active (training and ``p > 0``).

A model left in ``train()`` mode computes a different random output on every call, so no step stands
for another and caching is meaningless; the backend warns once. Read from the graph's own calls, not
from module classes: Dynamo records ``dropout(x, p, training)`` with the mode it traced.
"""

from __future__ import annotations

import torch.fx as fx

_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


def _argument(node: fx.Node, index: int, name: str, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def has_active_dropout(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "")
        if name in _DROPOUTS:
            p, training = _argument(node, 1, "p", 0.5), _argument(node, 2, "training", True)
        elif name == "scaled_dot_product_attention":
            p, training = _argument(node, 4, "dropout_p", 0.0), True
        else:
            continue
        if training is True and isinstance(p, (int, float)) and p > 0:
            return True
    return False
