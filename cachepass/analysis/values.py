"""Small readers of node metadata shared by the analysis passes."""

from __future__ import annotations

import torch
import torch.fx as fx

from .._dynamo import placeholder_source


def example_value(node: fx.Node):
    """The fake (or real) value Dynamo recorded for ``node``, or ``None``."""
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_signature(node: fx.Node) -> tuple | None:
    """``(shape as strings, dtype)`` for a tensor node; strings so symbolic sizes compare without guards."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(str(d) for d in value.shape), value.dtype


def input_name(node: fx.Node) -> str:
    """A readable name for a caller input: ``L['kwargs']['timestep']`` -> ``timestep``, ``L['t']`` -> ``t``."""
    import re

    keys = re.findall(r"\['([^']+)'\]|\[(\d+)\]", source_name(node))
    names = [k or i for k, i in keys if (k or i) not in ("kwargs",)]
    if not names:  # Dynamo's placeholder names spell the source: l_kwargs_timestep_, l_args_1_, l_t_
        m = re.fullmatch(r"l_(?:kwargs_)?(args_(\d+)_|(.+?))_?", node.name)
        if m is None:
            return node.name
        return f"args[{m.group(2)}]" if m.group(2) else m.group(3)
    if names[0] == "args" and len(names) > 1:
        return f"args[{names[1]}]"
    return names[-1] if len(names) <= 2 else ".".join(names[1:])


def is_tensor(node: fx.Node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def source_name(node: fx.Node) -> str:
    """Dynamo's source expression for a placeholder (``L['timestep']``), else the node name."""
    source = placeholder_source(node)
    return source if source is not None else node.name


def is_user_input(node: fx.Node) -> bool:
    """A placeholder fed by the caller's arguments, not by the module's parameters or buffers.

    Dynamo names module state through the module (``L['self']._modules['blocks']...``, or
    ``L['fn']...`` / ``G['model']...`` depending on how the module was reached); caller inputs are
    ``L['x']``, ``L['args'][0]``, ``L['kwargs']['timestep']``.
    """
    if node.op != "placeholder":
        return False
    name = source_name(node)
    if any(tok in name for tok in ("_modules", "_parameters", "_buffers", "__dict__")):
        return False
    if name.startswith(("L['self'].", "L['fn'].", "G[")):
        return False
    return not node.name.startswith(("l_self_", "l_fn_", "g_"))
