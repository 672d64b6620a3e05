"""Device meshes and logical-axis sharding.

Every parameter carries logical axis names (``('embed', 'mlp')``); one rules table in the
config maps them to mesh axes (``'data'``, ``'fsdp'``, ``'tensor'``). Changing the
parallelism is a config change only:

  config.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}     # -1: fill with the devices left
  config.sharding_rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...)

A logical axis that no rule names is replicated. A dimension that the mesh axes it maps to do
not divide evenly is replicated too (tiny test models on big meshes), and reported once by
`explain_shardings` so nothing happens silently.

Activations carry logical names too ('activation_batch', 'activation_length',
'activation_embed', 'activation_vocab'), mapped by the same rules table. The models call
`constrain_activation(x, names)` at a few points (after the embedding, after each block, at
the logits); it pins `x` with `jax.lax.with_sharding_constraint` only while a train / eval
step traces inside `activation_sharding(mesh, rules)`, and is a no-op everywhere else
(single-device use, tests, generation). Without these constraints XLA's propagation follows
the fsdp-sharded weights instead of the batch (docs/benchmarks.md, AOT section).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Activations' logical axes (see `constrain_activation`): the batch over every data-parallel
# axis; length and model width replicated (each device holds whole rows of the residual
# stream; fsdp all-gathers the weights instead); vocab as the rule set says.
ACTIVATION_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
)
# Ready-made rule sets. 'batch' is the batch axis of the data.
DATA_PARALLEL_RULES = (("batch", ("data", "fsdp")),) + ACTIVATION_RULES + (
    ("activation_vocab", None),)
# 'encoder_embed' / 'vision_embed': the encoders' widths where they meet the connector.
FSDP_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("encoder_embed", "fsdp"),
    ("vision_embed", "fsdp"),
) + ACTIVATION_RULES + (("activation_vocab", None),)
FSDP_TP_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("encoder_embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),  # Mamba-2's per-head A_log, D, dt_bias (heads split as d_inner)
) + ACTIVATION_RULES + (("activation_vocab", "tensor"),)  # logits and loss split as the head
# Replicated on purpose (no rule): 'ssm_in_proj' (Mamba-2's in_proj output concatenates z, x,
# B, C and dt, so a contiguous split would cut across roles) and 'ssm_conv' (its conv over x, B,
# C); 'ssm_state', 'ssm_rank', 'ssm_proj', 'conv_width' (small).
RULE_SETS = {"dp": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES, "fsdp_tp": FSDP_TP_RULES}

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh with Auto axes from `{'data': -1, ...}`.

  At most one axis may be -1 ("fill"): it takes all devices the other axes leave. Auto axis
  types are chosen on purpose: the compiler propagates shardings from the explicit in/out
  shardings of our jitted steps (jax 0.10's `jax.make_mesh` would default to Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes: {MESH_AXES}")
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={dict(shape)}: at most one axis may be -1 (fill)")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(shape)}: sizes must be positive or -1 (fill)")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh={dict(shape)}: {len(devices)} devices are not divisible by "
                       f"the fixed axes' product {fixed}")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh={dict(shape)} needs {math.prod(sizes)} devices but "
                     f"{len(devices)} are present; use -1 on one axis to fill")
  device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
  """A rules table as {logical axis: (mesh axes, ...)}; malformed rules are ValueErrors."""
  out = {}
  for entry in rules:
    if len(entry) != 2:
      raise ValueError(f"sharding rule {entry!r} must be a (logical_name, mesh_axes) pair")
    logical, mesh_axes = entry
    if logical in out:
      raise ValueError(f"sharding rules name logical axis {logical!r} twice")
    if mesh_axes is None:
      axes = ()
    elif isinstance(mesh_axes, str):
      axes = (mesh_axes,)
    else:
      axes = tuple(mesh_axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rule {entry!r} names unknown mesh axes {bad}; valid: {MESH_AXES}")
    out[logical] = axes
  return out


def logical_to_mesh_spec(logical: Sequence[str | None] | P, rules: Rules,
                         mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> P:
  """Maps a logical spec such as ('embed', 'mlp') to a mesh PartitionSpec.

  With `mesh` and `shape`, a dimension that its mesh axes do not divide is replicated, and a
  mesh axis already used by an earlier dimension is not used again.
  """
  table = rules_dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(tuple(logical)):
    axes = table.get(name, ()) if name is not None else ()
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_shardings(abstract_tree: Any, logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of arrays given a same-structured tree of logical specs."""
  return jax.tree.map(
      lambda x, spec: NamedSharding(mesh, logical_to_mesh_spec(spec, rules, mesh, x.shape)),
      abstract_tree, logical_specs,
      is_leaf=lambda s: isinstance(s, P))


def _dict_path(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: Any, param_specs: Mapping, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for a whole train state (params, optimizer state, step, rng).

  `param_specs` maps each parameter's dict path (tuple of keys) to its logical spec. Any leaf
  of the state whose dict-key path ends with a parameter's path and has its shape (optax's
  `mu`, `nu`, ...) gets that parameter's sharding; every other leaf (step, optax's scalar
  `count`, rng keys) is replicated explicitly with P().
  """
  def one(path, x):
    keys = _dict_path(path)
    for start in range(len(keys)):
      spec = param_specs.get(keys[start:])
      if spec is not None and len(spec) <= len(x.shape):
        return NamedSharding(mesh, logical_to_mesh_spec(spec, rules, mesh, x.shape))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, abstract_state)


def param_logical_specs(abstract_param_state) -> dict[tuple, P]:
  """{dict path: logical PartitionSpec} for an nnx.State of parameters.

  Raises if a parameter carries no logical axis names: every weight must say how it shards.
  """
  from flax import nnx  # local: keep this module importable without flax for tooling

  specs = nnx.get_partition_spec(abstract_param_state).to_pure_dict()
  flat = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, P))[0]:
    keys = _dict_path(path)
    flat[keys] = spec
  values = jax.tree_util.tree_flatten_with_path(abstract_param_state.to_pure_dict())[0]
  for path, x in values:
    keys = _dict_path(path)
    if len(x.shape) and len(flat.get(keys, P())) == 0:
      raise ValueError(f"parameter {'/'.join(map(str, keys))} (shape {x.shape}) has no logical "
                       "axis names; annotate it with nnx.with_partitioning / out_sharding")
  return flat


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a data batch: the leading axis over the rules' 'batch' mesh axes."""
  spec = logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "metalm_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules | None):
  """While active, `constrain_activation` pins activations by `rules` on `mesh`.

  Enter it inside the function being traced (the train / eval step body): the constraints
  are recorded at trace time. `rules=None` switches them off (as outside the context).
  """
  token = _ACTIVATION_CONTEXT.set(None if rules is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVATION_CONTEXT.reset(token)


def activation_spec(logical: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int]) -> P | None:
  """The PartitionSpec `constrain_activation` applies to an activation of `shape`.

  Per dimension: the rule's mesh axes (a rule to None replicates it); `P.UNCONSTRAINED`
  (the compiler decides, as without a constraint) where no rule names the logical axis or
  the mesh axes do not divide the dimension (a batch of 2 on 8 devices). None when no
  dimension is constrained at all: nothing to pin.
  """
  table = rules_dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(tuple(logical)):
    if name is None or name not in table:
      out.append(P.UNCONSTRAINED)
      continue
    axes = tuple(a for a in table[name] if a not in used and mesh.shape[a] > 1)
    if axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
      out.append(P.UNCONSTRAINED)
      continue
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  if all(e is P.UNCONSTRAINED for e in out):
    return None
  return P(*out)


def constrain_activation(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """`x` pinned to its logical axes' mesh sharding inside `activation_sharding`, else `x`.

  e.g. `constrain_activation(h, ('activation_batch', 'activation_length', 'activation_embed'))`
  on the residual stream [B, L, D]: under the fsdp rules each device keeps its own rows,
  so XLA all-gathers the fsdp-sharded weights instead of gathering other devices' rows.
  """
  context = _ACTIVATION_CONTEXT.get()
  if context is None:
    return x
  mesh, rules = context
  if len(logical) != x.ndim:
    raise ValueError(f"constrain_activation: {len(logical)} logical axes {tuple(logical)} for "
                     f"an array of shape {x.shape}")
  spec = activation_spec(logical, rules, mesh, x.shape)
  if spec is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def explain_shardings(abstract_tree: Any, shardings: Any) -> list[str]:
  """Human-readable lines 'path shape -> PartitionSpec' (for logs and golden tests)."""
  lines = []
  flat_x = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  for (path, x), s in zip(flat_x, flat_s):
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} -> {s.spec}")
  return lines
