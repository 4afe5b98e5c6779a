"""Old names kept working after a rename: each use warns (``DeprecationWarning``) at the caller's line.

* :func:`renamed_attribute`: a read-only property under the old name of a field or property;
* :func:`renamed_keywords`: a class (a dataclass) whose constructor also takes the old keyword names;
* :func:`renamed_module_attributes`: a module ``__getattr__`` serving the old names of module globals.
"""

from __future__ import annotations

import functools
import sys
import warnings


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now ``new``; ``stacklevel`` 3 points at the caller of the function calling this."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


def renamed_attribute(new: str, old_name: str, new_name: str) -> property:
    """A property that warns (``old_name`` is deprecated, use ``new_name``) and returns ``self.<new>``."""

    def get(self):
        warn_renamed(old_name, new_name)
        return getattr(self, new)

    return property(get, doc=f"Deprecated: {new_name}.")


def renamed_keywords(renames: dict[str, str]):
    """Class decorator: the constructor also accepts each old keyword of ``renames`` (old -> new), warning."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}() got both {old!r} (deprecated) and {new!r}")
                    warn_renamed(f"{cls.__name__}({old}=...)", f"{cls.__name__}({new}=...)")
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def renamed_module_attributes(module: str, renames: dict[str, str]):
    """A module ``__getattr__`` (assign it in that module) serving each old name of ``renames`` (old ->
    new global of ``module``) with a warning; other missing names raise ``AttributeError`` as usual."""

    def __getattr__(name: str):
        if name in renames:
            warn_renamed(f"{module}.{name}", f"{module}.{renames[name]}")
            return getattr(sys.modules[module], renames[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
