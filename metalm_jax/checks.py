"""Keyword-argument checks shared by the config schema and the model registry.

A model is configured by a dict of its constructor's keyword arguments (`config.model`, and
nested dicts for its sub-modules). `check_kwargs(cls, kwargs, where)` is the one place such a
dict is checked: unknown keys (with a "did you mean"), values whose type does not fit the
argument's default or annotation, dtype names, missing required arguments, and, recursively,
the sub-module dicts a class declares in its `SUBMODULES` attribute. The models build their
sub-modules with `build(cls, kwargs, where, **injected)`, which checks first; the config
validates a whole `config.model` the same way before anything is built.

`dir_listing(path)` is what error messages about a directory show of it (checkpoints,
pretrained model folders).

Nothing here imports the rest of the package: `config` and `models` both depend on it.
"""
from __future__ import annotations

import difflib
import os
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

# Arguments a parent passes to its sub-modules itself: never keys of a config dict.
ALWAYS_INJECTED = frozenset({"self", "rngs", "dtype", "param_dtype"})
# A value of the annotated type, for type checks of arguments without a default.
_EXAMPLE_OF_ANNOTATION = {"int": 0, "float": 0.0, "bool": False, "str": "",
                          str(int): 0, str(float): 0.0, str(bool): False, str(str): ""}


class KwargsError(ValueError):
  """A key or value of a keyword-argument dict is wrong; the message names it and the fix."""


def suggest(key: str, valid) -> str:
  """' Did you mean 'x'?' for the closest of `valid`, or ''."""
  close = difflib.get_close_matches(key, list(valid), n=1)
  return f" Did you mean {close[0]!r}?" if close else ""


def compatible(value: Any, default: Any) -> bool:
  """Whether `value` may replace `default` (ints for floats, any sequence for a tuple...)."""
  if default is None or value is None:
    return True
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(default, Mapping) or hasattr(default, "keys"):
    return isinstance(value, Mapping) or hasattr(value, "keys")
  return isinstance(value, type(default))


def accepted(cls) -> dict[str, inspect.Parameter]:
  """The keyword arguments `cls.__init__` takes from a config dict; an `__init__` with
  `**kwargs` also takes those of the next class up that defines `__init__`."""
  params = inspect.signature(cls.__init__).parameters
  out = {k: p for k, p in params.items()
         if k not in ("self", "rngs") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    parent = next((base for base in cls.__mro__[1:] if "__init__" in vars(base)), None)
    if parent is not None and parent is not object:
      out = {**accepted(parent), **out}
  return out


class Submodule(NamedTuple):
  """A sub-module dict argument: its class, the arguments the parent passes itself
  (`injected`: a config may not set them) and those the parent fills in when the config
  leaves them out (`defaulted`: optional in the config even if the class requires them)."""
  cls: type
  injected: tuple[str, ...] = ()
  defaulted: tuple[str, ...] = ()


def _check_dtype(where: str, value) -> None:
  import jax.numpy as jnp  # local: only dtype names need jax
  try:
    jnp.dtype(value)
  except TypeError as e:
    raise KwargsError(f"{where}={value!r} is not a dtype name; use e.g. 'float32' or "
                      "'bfloat16'") from e


def check_kwargs(cls, kwargs: Mapping, where: str, *, injected=(), defaulted=()) -> None:
  """Raises KwargsError for a key `cls` does not take, an ill-typed value, a missing
  required argument, or the same in a sub-module dict (`cls.SUBMODULES`).

  Args:
    cls: the module class.
    kwargs: the dict of its keyword arguments (e.g. `dict(config.model)` without 'name').
    where: the dict's config path for messages, e.g. 'config.model.decoder'.
    injected: arguments the caller passes itself (not allowed in `kwargs`).
    defaulted: required arguments the caller fills in when `kwargs` leaves them out.
  """
  params = accepted(cls)
  settable = {k: p for k, p in params.items()
              if k not in injected and (k not in ALWAYS_INJECTED or where == "config.model")}
  submodules = getattr(cls, "SUBMODULES", {})
  for key, value in kwargs.items():
    if key not in settable:
      raise KwargsError(f"unknown key {where}.{key} for {cls.__name__}.{suggest(key, settable)} "
                        f"Valid keys: {sorted(settable)}")
    if key.endswith("dtype"):
      _check_dtype(f"{where}.{key}", value)
      continue
    if key in submodules:
      if value is None:
        continue
      if not (isinstance(value, Mapping) or hasattr(value, "keys")):
        raise KwargsError(f"{where}.{key}={value!r} must be a dict of "
                          f"{submodules[key][0].__name__} arguments")
      sub = submodules[key]
      check_kwargs(sub.cls, dict(value), f"{where}.{key}", injected=sub.injected,
                   defaulted=sub.defaulted)
      continue
    default = settable[key].default
    if default is inspect.Parameter.empty or default is None:
      default = _EXAMPLE_OF_ANNOTATION.get(str(settable[key].annotation).split(" |")[0])
    if not compatible(value, default):
      raise KwargsError(f"{where}.{key}={value!r} has type {type(value).__name__}; "
                        f"{cls.__name__} expects {type(default).__name__} (default {default!r})")
  missing = [k for k, p in settable.items() if p.default is inspect.Parameter.empty
             and k not in kwargs and k not in ALWAYS_INJECTED and k not in defaulted]
  if missing:
    raise KwargsError(f"{where} is missing required keys {missing} for {cls.__name__}")


def build(cls, kwargs: Mapping, where: str, **injected):
  """`cls(**kwargs, **injected)` after `check_kwargs` (unknown keys name `where`)."""
  check_kwargs(cls, kwargs, where, injected=tuple(injected))
  return cls(**dict(kwargs), **injected)


def dir_listing(path: str, limit: int = 10) -> str:
  """The first `limit` names in directory `path`, sorted, for an error message: 'a, b, ...
  (n more)', '(empty)' or '(unreadable: reason)'."""
  try:
    entries = sorted(os.listdir(path))
  except OSError as e:
    return f"(unreadable: {e.strerror})"
  if not entries:
    return "(empty)"
  more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
  return ", ".join(entries[:limit]) + more
