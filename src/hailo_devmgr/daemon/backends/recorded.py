"""Hold a simulated class to one HailoRT version's recorded API (see hailort_api.py).

``follow(impl, name, surface)`` returns a subclass of ``impl`` in which:

- a public method or property that the version lacks raises AttributeError,
  as the real object would;
- a recorded method binds its arguments to the recorded signature first, so
  a keyword the version lacks, a missing argument or one too many raises
  TypeError as Python (or pybind11) would, and the implementation is then
  called with every argument by its recorded name; a method whose
  implementation has exactly the recorded parameters is left unwrapped
  (Python's own binding refuses the same calls);
- a parameter recorded with ``type: str`` (a C++ ``std::string``) refuses
  None with TypeError, as pybind11 does.

The implementations take the union of every version's parameters, under
HailoRT's own names; this layer takes away what one version does not have.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from .hailort_api import ApiSurface

_PYBIND_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool}


class _Absent:
    """A member the recorded version does not have."""

    def __init__(self, class_name: str, name: str, version: str):
        self.message = f"'{class_name}' object has no attribute '{name}' (HailoRT {version})"

    def __get__(self, instance, owner=None):
        raise AttributeError(self.message)


def _checked(method: Any, qualname: str, signature: inspect.Signature, types: dict, static: bool) -> Any:
    function = method.__func__ if isinstance(method, staticmethod) else method
    if not types and _binds_alike(function, signature, static):
        # Python binding the implementation's own parameters accepts and
        # refuses exactly the calls the recorded ones would: no wrapper (the
        # simulated device makes several such calls per inference).
        return method
    shapes: dict = {}   # (positional count, keyword names) -> names of the positional ones

    type_checks = tuple(types.items())
    own_positional = _positional_parameters(function, static)

    @functools.wraps(function)
    def call(*args, **kwargs):
        bound_args = args if static else args[1:]
        shape = (len(bound_args), tuple(kwargs)) if kwargs else len(bound_args)
        names = shapes.get(shape)
        if names is None:
            # Signature.bind once per way of calling, not on every call (the
            # simulated device runs this per inference): a shape that binds
            # always binds, and its positional values always take these names.
            names = _positional_names(signature, qualname, shape)
            if not kwargs and names == own_positional[:len(names)] and not types.keys() & set(names):
                names = _AS_GIVEN   # the same names in the same places, nothing to check by type
            shapes[shape] = names
        if names is _AS_GIVEN:
            return function(*args)
        if names is _BIND_EACH_CALL:
            named = _bound_by_name(signature, qualname, bound_args, kwargs)
        else:
            named = dict(zip(names, bound_args))
            if kwargs:
                named.update(kwargs)
        for name, wanted in type_checks:
            if name in named and not isinstance(named[name], wanted):
                raise TypeError(f"{qualname}(): incompatible function arguments: {name} must be "
                                f"{getattr(wanted, '__name__', wanted)}, got {type(named[name]).__name__}")
        return function(**named) if static else function(args[0], **named)

    return staticmethod(call) if static else call


_BIND_EACH_CALL = object()   # a signature with *args or **kwargs: bound on every call
_AS_GIVEN = object()         # positional values the implementation takes in the recorded order


def _binds_alike(function: Any, signature: inspect.Signature, static: bool) -> bool:
    """The same parameters as recorded (names, order, kinds, which have defaults)."""
    own = list(inspect.signature(function).parameters.values())
    own = own if static else own[1:]
    recorded = list(signature.parameters.values())
    return len(own) == len(recorded) and all(
        (mine.name, mine.kind, mine.default is inspect.Parameter.empty)
        == (theirs.name, theirs.kind, theirs.default is inspect.Parameter.empty)
        for mine, theirs in zip(own, recorded))


def _positional_parameters(function: Any, static: bool) -> tuple:
    """The implementation's positional parameter names (``self`` left out)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(name for name, parameter in inspect.signature(function).parameters.items()
                  if parameter.kind in kinds)
    return names if static else names[1:]


def _positional_names(signature: inspect.Signature, qualname: str, shape: tuple):
    """The names the positional values of a call of this shape take (TypeError
    if the recorded signature refuses the shape, as the real binding would)."""
    count, keywords = shape if isinstance(shape, tuple) else (shape, ())
    try:
        signature.bind(*range(count), **dict.fromkeys(keywords))
    except TypeError as exc:
        raise TypeError(f"{qualname}(): {exc}") from None
    kinds = {parameter.kind for parameter in signature.parameters.values()}
    if kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return _BIND_EACH_CALL
    return tuple(signature.parameters)[:count]


def _bound_by_name(signature: inspect.Signature, qualname: str, args: tuple, kwargs: dict) -> dict:
    """Every value under its recorded name (by name: where versions differ in
    order, as 5.2 put ``videos`` third in VLM.generate)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{qualname}(): {exc}") from None
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def _public_members(impl: type) -> set[str]:
    names = set()
    for klass in impl.__mro__:
        if klass is object:
            continue
        names.update(name for name in vars(klass) if not name.startswith("_"))
    return names


def follow(impl: type, name: str, surface: ApiSurface, extra: dict | None = None,
           constructed_by_users: bool = False) -> type:
    """``impl`` as HailoRT ``surface.version`` shows class ``name`` (see the module docstring).

    ``__init__`` is held to the recorded signature only for classes users
    construct (VDevice, Device, VLM, ...); the others are made by HailoRT
    itself from internal handles, and so by the simulation."""
    spec = surface.classes.get(name)
    if spec is None:
        raise KeyError(f"class {name} is not in HailoRT {surface.version}'s recorded API")
    members = dict(extra or {})
    recorded = surface.members(name)
    for member in _public_members(impl):
        attribute = inspect.getattr_static(impl, member)
        if isinstance(attribute, type) or member.isupper():
            continue  # nested classes and constants are not members we gate
        if member not in recorded:
            members[member] = _Absent(name, member, surface.version)
    for method_name, method_spec in (spec.get("methods") or {}).items():
        if method_name.startswith("_") and not (method_name == "__init__" and constructed_by_users):
            continue
        attribute = inspect.getattr_static(impl, method_name, None)
        if attribute is None or isinstance(attribute, property):
            continue
        types = {entry["name"]: _PYBIND_TYPES[entry["type"]] for entry in method_spec.get("params") or []
                 if entry.get("type") in _PYBIND_TYPES}
        members[method_name] = _checked(attribute, f"{name}.{method_name}",
                                        surface.signature(name, method_name), types,
                                        bool(method_spec.get("static")))
    return type(name.rsplit(".", 1)[-1], (impl,), {"__module__": impl.__module__, **members})
