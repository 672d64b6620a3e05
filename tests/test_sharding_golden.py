"""Golden sharding tests: the mesh PartitionSpec of every parameter, per model family and rule set.

For each family in FAMILIES and each rule set in `sharding.RULE_SETS`, the model is built
abstractly (`nnx.eval_shape`: no parameter memory, no compilation), every parameter's logical
spec is mapped onto an abstract ('data', 'fsdp', 'tensor') = MESH_SHAPE mesh, and the result
is compared with `tests/golden/sharding/<family>_<ruleset>.txt`, one sorted line per parameter:

  decoder/blocks/0/mlp/wi/kernel (512, 1536) ('embed', 'mlp') -> PartitionSpec('fsdp', 'tensor')
  <path joined by '/'>           <shape>     <logical axes>   -> <mesh PartitionSpec>

After an intended change (a new parameter, a new rule), regenerate the files and review the diff:

  UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_sharding_golden.py

The sanity tests (`test_rule_set_invariants`) check the properties that make the goldens mean
something (dp replicates everything, fsdp shards every model-width matrix over 'fsdp', fsdp_tp puts
the MLP and attention heads on 'tensor'), on the same lines, so a regenerated golden file
cannot silently bless a regression.

A new model family is one entry in FAMILIES (then run with UPDATE_GOLDEN=1 once).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from metalm_jax import config as config_lib
from metalm_jax import sharding
from metalm_jax.train import state as state_lib
from metalm_jax.train import optimizer as optimizer_lib
from tests.test_config import ROOT, load_config

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden", "sharding")
UPDATE_COMMAND = "UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_sharding_golden.py"
UPDATE = os.environ.get("UPDATE_GOLDEN", "").lower() not in ("", "0", "false", "no")
# Every axis > 1 and fsdp != tensor, so a spec that uses the wrong axis cannot look right.
MESH_SHAPE = (2, 4, 2)
MAX_DIFF_LINES = 200
MAX_ERRORS = 40


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: `configs/<config>.py` at `get_config(arg)`, then `overrides`.

  Pick sizes whose sharded dimensions divide MESH_SHAPE (checked by
  `test_rule_set_invariants`), or the goldens record replication-by-indivisibility.
  """
  config: str
  arg: str
  overrides: tuple[tuple[str, object], ...] = ()  # (dotted key under config.model, value)
  why: str = ""  # what this entry covers beyond the default config
  peft: tuple[tuple[str, object], ...] = ()  # config.peft (key, value) pairs: LoRA factors

  def model_config(self) -> ml_collections.ConfigDict:
    model = load_config(self.config, self.arg).model.to_dict()
    for key, value in self.overrides:
      node = model
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise KeyError(f"override {key!r}: config.model has no such key")
      node[leaf] = value
    return ml_collections.ConfigDict(model)

  def peft_config(self) -> ml_collections.ConfigDict | None:
    if not self.peft:
      return None
    peft = config_lib.base_config().peft
    for key, value in self.peft:
      peft[key] = value
    return peft

  def describe(self) -> str:
    over = "".join(f" {k}={v!r}" for k, v in self.overrides)
    over += "".join(f" peft.{k}={v!r}" for k, v in self.peft)
    return f"configs/{self.config}.py:{self.arg}{over}"


FAMILIES = {
    "decoder": Family("decoder_lm", "size=small"),
    "decoder_scanned": Family("decoder_lm", "size=small", overrides=(("scan_layers", True),),
                              why="stacked blocks: a leading 'layers' axis, replicated"),
    "decoder_lora": Family("decoder_lm", "size=small", peft=(("method", "lora"),),
                           why="LoRA factors: A the kernel's input axes + an unsharded rank "
                               "axis, B the rank axis + the output axes"),
    "decoder_scanned_lora": Family("decoder_lm", "size=small",
                                   overrides=(("scan_layers", True),),
                                   peft=(("method", "lora"),),
                                   why="LoRA on stacked blocks: 'layers' leads both factors"),
    "hybrid": Family("hybrid_lm", "size=small"),
    "hybrid_mamba2": Family("hybrid_lm", "size=small,mamba=2",
                            why="Mamba-2 layers: per-head A_log / D / dt_bias, gated norm"),
    "metalm_lm": Family("metalm_lm", "size=tiny,connector=resampler",
                        why="the resampler's first layer is the linear connector: covers both"),
    "metalm_vl": Family("metalm_vl", "size=tiny", overrides=(("vision_encoder.d_model", 128),),
                        why="ViT wider than the text encoder (128 vs 64): builds vision_projection"),
    "mplug": Family("mplug", "size=tiny", overrides=(("vision_encoder.d_model", 128),),
                    why="fusion layers of both kinds (AAACAA), the seq2seq decoder, ITC/ITM/MLM "
                        "heads; ViT 128 wide vs 64: builds vision_projection"),
}
RULE_SET_NAMES = tuple(sharding.RULE_SETS)
CASES = [(f, r) for f in FAMILIES for r in RULE_SET_NAMES]


def abstract_mesh() -> AbstractMesh:
  return AbstractMesh(MESH_SHAPE, sharding.MESH_AXES)


@functools.cache
def build_model(family: str) -> state_lib.Model:
  """The abstract model (nnx.eval_shape), once per family per session."""
  return state_lib.Model(FAMILIES[family].model_config(), FAMILIES[family].peft_config())


# ------------------------------------------------------------------ golden lines
def format_spec(spec: P) -> str:
  """Stable text of a PartitionSpec, independent of jax's repr ('PartitionSpec(...)' / 'P(...)')."""
  return "PartitionSpec(" + ", ".join(repr(e) for e in spec) + ")"


def spec_lines(family: str, rule_set: str) -> list[str]:
  """Sorted 'path shape logical -> PartitionSpec(...)' lines, one per parameter."""
  model = build_model(family)
  rules, mesh = sharding.RULE_SETS[rule_set], abstract_mesh()
  lines = []
  for path, x in jax.tree_util.tree_flatten_with_path(model.abstract_params)[0]:
    keys = tuple(k.key for k in path)
    logical = tuple(model.logical_specs.get(keys, P()))
    spec = sharding.logical_to_mesh_spec(logical, rules, mesh, x.shape)
    lines.append(f"{'/'.join(map(str, keys))} {tuple(x.shape)} {logical} -> {format_spec(spec)}")
  return sorted(lines)


def header(family: str, rule_set: str) -> list[str]:
  mesh = ", ".join(f"{a}={n}" for a, n in zip(sharding.MESH_AXES, MESH_SHAPE))
  return [f"# family={family} ({FAMILIES[family].describe()}) rules={rule_set} mesh=({mesh})",
          f"# path shape logical_axes -> mesh spec. Regenerate: {UPDATE_COMMAND}"]


@dataclasses.dataclass(frozen=True)
class Line:
  path: str
  shape: tuple[int, ...]
  logical: tuple[str | None, ...]
  spec: tuple  # PartitionSpec entries: None, 'axis' or ('axis', ...)

  def axes_of_dim(self, dim: int) -> tuple[str, ...]:
    entry = self.spec[dim] if dim < len(self.spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

  def mesh_axes(self) -> list[str]:
    return [a for d in range(len(self.shape)) for a in self.axes_of_dim(d)]


_LINE = re.compile(r"^(\S+) (\([^)]*\)) (\([^)]*\)) -> PartitionSpec\((.*)\)$")


def parse_line(text: str) -> Line:
  match = _LINE.match(text)
  if not match:
    raise ValueError(f"malformed golden line: {text!r}")
  path, shape, logical, spec = match.groups()
  return Line(path, ast.literal_eval(shape), ast.literal_eval(logical),
              ast.literal_eval(f"({spec},)") if spec else ())


def golden_path(family: str, rule_set: str) -> str:
  return os.path.join(GOLDEN_DIR, f"{family}_{rule_set}.txt")


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("family,rule_set", CASES)
def test_golden_shardings(family, rule_set):
  """Every parameter's mesh spec equals the checked-in golden file (or rewrites it)."""
  actual = header(family, rule_set) + spec_lines(family, rule_set)
  path = golden_path(family, rule_set)
  rel = os.path.relpath(path, ROOT)
  if UPDATE:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, "w") as f:
      f.write("\n".join(actual) + "\n")
    return
  if not os.path.exists(path):
    pytest.fail(f"no golden file {rel} for family={family!r} rules={rule_set!r}; "
                f"generate it with `{UPDATE_COMMAND}` and review it before committing")
  with open(path) as f:
    expected = f.read().splitlines()
  if expected != actual:
    diff = list(difflib.unified_diff(expected, actual, fromfile=f"{rel} (golden)",
                                     tofile="computed now", lineterm=""))
    if len(diff) > MAX_DIFF_LINES:
      diff = diff[:MAX_DIFF_LINES] + [f"... {len(diff) - MAX_DIFF_LINES} more diff lines"]
    pytest.fail(f"parameter shardings of family={family!r} under rules={rule_set!r} changed "
                f"({FAMILIES[family].describe()}, mesh {MESH_SHAPE}):\n" + "\n".join(diff) +
                f"\n\nIf the change is intended, regenerate with `{UPDATE_COMMAND}` and "
                "commit the reviewed golden files.", pytrace=False)


# ------------------------------------------------------------------ extra train state
# Families whose train state carries more than params and optimizer state: the golden lines
# of `TrainState.extra` (mPLUG pretraining: the momentum encoders follow their params' specs,
# the ITC queues are replicated).
EXTRA_CASES = [("mplug", r) for r in RULE_SET_NAMES]


def extra_spec_lines(family: str, rule_set: str) -> list[str]:
  """Sorted 'extra/<path> shape -> PartitionSpec(...)' lines of the family's extra state."""
  from metalm_jax import families

  config = ml_collections.ConfigDict(load_config(FAMILIES[family].config,
                                                 FAMILIES[family].arg).to_dict())
  config.model = FAMILIES[family].model_config()
  family_obj = families.build(config)
  model = build_model(family)
  tx = optimizer_lib.make_optimizer(config.optimizer, num_train_steps=100)
  abstract, shardings = state_lib.abstract_train_state(
      model, tx, jax.random.key(0), abstract_mesh(), sharding.RULE_SETS[rule_set],
      init_extra=family_obj.init_extra)
  flat = jax.tree_util.tree_flatten_with_path(abstract.extra)[0]
  specs = jax.tree.leaves(shardings.extra, is_leaf=lambda x: isinstance(x, NamedSharding))
  assert len(flat) == len(specs) > 0
  return sorted(f"extra/{'/'.join(str(getattr(k, 'key', k)) for k in path)} "
                f"{tuple(x.shape)} -> {format_spec(spec.spec)}"
                for (path, x), spec in zip(flat, specs))


def extra_golden_path(family: str, rule_set: str) -> str:
  return os.path.join(GOLDEN_DIR, f"{family}_extra_{rule_set}.txt")


@pytest.mark.parametrize("family,rule_set", EXTRA_CASES)
def test_golden_extra_state_shardings(family, rule_set):
  """The extra train state's shardings equal the golden file; momentum leaves have exactly
  their parameter's spec, everything else is replicated."""
  actual = header(family, rule_set) + extra_spec_lines(family, rule_set)
  params = {line.split(" ")[0]: line.split(" -> ")[1] for line in spec_lines(family, rule_set)}
  for line in actual[2:]:
    path, spec = line.split(" ")[0], line.split(" -> ")[1]
    if path.startswith("extra/momentum/"):
      assert spec == params[path[len("extra/momentum/"):]], line
    else:
      assert spec == "PartitionSpec()", line
  path = extra_golden_path(family, rule_set)
  if UPDATE:
    with open(path, "w") as f:
      f.write("\n".join(actual) + "\n")
    return
  if not os.path.exists(path):
    pytest.fail(f"no golden file {os.path.relpath(path, ROOT)}; generate it with "
                f"`{UPDATE_COMMAND}`")
  with open(path) as f:
    expected = f.read().splitlines()
  if expected != actual:
    diff = difflib.unified_diff(expected, actual, lineterm="", fromfile="golden", tofile="now")
    pytest.fail(f"extra-state shardings of {family} under {rule_set} changed:\n"
                + "\n".join(list(diff)[:MAX_DIFF_LINES]), pytrace=False)


def test_no_stale_golden_files():
  """Every golden file belongs to a (family, rule set) case: removed families leave none."""
  expected = {os.path.basename(golden_path(f, r)) for f, r in CASES}
  expected |= {os.path.basename(extra_golden_path(f, r)) for f, r in EXTRA_CASES}
  present = set(os.listdir(GOLDEN_DIR)) if os.path.isdir(GOLDEN_DIR) else set()
  stale = sorted(present - expected)
  if UPDATE:
    for name in stale:
      os.remove(os.path.join(GOLDEN_DIR, name))
    return
  assert not stale, (f"golden files {stale} in {os.path.relpath(GOLDEN_DIR, ROOT)} match no "
                     f"FAMILIES x RULE_SETS case; delete them or run `{UPDATE_COMMAND}`")


# Model-width axes (decoder, encoders, ViT): fsdp must shard every matrix over one of them.
FSDP_LOGICAL_AXES = ("embed", "encoder_embed", "vision_embed")

# Parameters that fsdp_tp must put on 'tensor' (path patterns; each must match in every family).
TENSOR_PARALLEL_PATHS = {
    "MLP kernel": re.compile(r"(^|/)(mlp|ffn)/(wi|wi_gate|wo)/kernel$"),
    "attention-head kernel": re.compile(r"(^|/)attention/(query|key|value|out)/kernel$"),
}
# Checked where present (not every family has them).
OPTIONAL_TENSOR_PARALLEL_PATHS = {
    "Mamba projection": re.compile(r"(^|/)mamba/(in_proj|out_proj)/kernel$"),
    # Mamba-2's in_proj concatenates roles ('ssm_in_proj', replicated); its out_proj splits.
    "Mamba-2 out projection": re.compile(r"(^|/)mamba2/out_proj/kernel$"),
}
TENSOR_LOGICAL_AXES = ("mlp", "heads", "kv_heads", "vocab", "ssm_inner", "ssm_heads")


@pytest.mark.parametrize("family,rule_set", CASES)
def test_rule_set_invariants(family, rule_set):
  """Properties each rule set must have, checked over the golden-format lines.

  The lines are computed now (not read back), so a regression fails here even after
  UPDATE_GOLDEN=1 has rewritten the golden files.
  """
  text = spec_lines(family, rule_set)
  lines = [parse_line(t) for t in text]
  assert lines, f"family={family!r} has no parameters"
  mesh = abstract_mesh()
  rules = sharding.RULE_SETS[rule_set]
  errors = []
  for line, t in zip(lines, text):
    why = []
    # Every dimension is annotated (a name or an explicit None), and no sharded dimension
    # fell back to replication because the mesh does not divide it (FAMILIES' sizes).
    if len(line.logical) != len(line.shape):
      why.append(f"{len(line.logical)} logical names for {len(line.shape)} dims")
    unsized = sharding.logical_to_mesh_spec(line.logical, rules, mesh)
    if tuple(unsized) != line.spec:
      why.append(f"the mesh does not divide it (else {format_spec(unsized)}): pick a family "
                 "size whose dimensions divide MESH_SHAPE")
    used = line.mesh_axes()
    if len(used) != len(set(used)):
      why.append("a mesh axis is used twice")
    if rule_set == "dp" and line.spec:
      why.append("'dp' must replicate every parameter")
    if rule_set == "fsdp" and set(used) - {"fsdp"}:
      why.append("'fsdp' may shard over 'fsdp' only")
    widths = [d for d, n in enumerate(line.logical) if n in FSDP_LOGICAL_AXES]
    if rule_set in ("fsdp", "fsdp_tp") and len(line.shape) >= 2 and widths:
      if not any("fsdp" in line.axes_of_dim(d) for d in widths):
        why.append(f"a weight matrix with a model-width axis ({FSDP_LOGICAL_AXES}) must have "
                   "one of them on 'fsdp'")
    if rule_set == "fsdp_tp":
      patterns = {**TENSOR_PARALLEL_PATHS, **OPTIONAL_TENSOR_PARALLEL_PATHS}
      why += [f"{what} must be sharded over 'tensor'" for what, pattern in patterns.items()
              if pattern.search(line.path) and "tensor" not in used]
      tp_dims = [d for d, n in enumerate(line.logical) if n in TENSOR_LOGICAL_AXES]
      if tp_dims and "tensor" not in line.axes_of_dim(tp_dims[0]):
        why.append(f"its first tensor-parallel axis {line.logical[tp_dims[0]]!r} "
                   f"(dim {tp_dims[0]}) must be on 'tensor'")
    if why:
      errors.append(f"{t}\n      " + "; ".join(why))
  if rule_set == "fsdp_tp":  # the path checks above must not pass vacuously
    for what, pattern in TENSOR_PARALLEL_PATHS.items():
      if not any(pattern.search(line.path) for line in lines):
        errors.append(f"no {what} matches {pattern.pattern!r}: update TENSOR_PARALLEL_PATHS "
                      "if the parameter paths changed")
  if errors:
    shown = errors[:MAX_ERRORS] + ([f"... and {len(errors) - MAX_ERRORS} more"]
                                   if len(errors) > MAX_ERRORS else [])
    pytest.fail(f"{len(errors)} sharding invariant violation(s) for family={family!r} "
                f"rules={rule_set!r} ({FAMILIES[family].describe()}, mesh {MESH_SHAPE}):\n  "
                + "\n  ".join(shown), pytrace=False)


def _key_name(k) -> str | None:
  return k.name if isinstance(k, jax.tree_util.GetAttrKey) else None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_optimizer_state_follows_params(family):
  """AdamW mu/nu get their parameter's sharding; scalars (count, step) and the rng: P()."""
  model = build_model(family)
  rules, mesh = sharding.FSDP_TP_RULES, abstract_mesh()
  tx = optimizer_lib.make_optimizer(config_lib.base_config().optimizer, num_train_steps=100)

  def init(params):
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(0)), nonfinite_skips=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init, model.abstract_params)
  shardings = sharding.state_shardings(abstract, model.logical_specs, mesh, rules)
  param_shapes = {tuple(k.key for k in path): x.shape for path, x in
                  jax.tree_util.tree_flatten_with_path(model.abstract_params)[0]}
  expected = {keys: sharding.logical_to_mesh_spec(model.logical_specs[keys], rules, mesh, shape)
              for keys, shape in param_shapes.items()}
  assert any(len(s) for s in expected.values()), "no parameter is sharded: vacuous test"

  flat_x = jax.tree_util.tree_flatten_with_path(abstract)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  assert len(flat_x) == len(flat_s)
  seen = {"params": 0, "mu": 0, "nu": 0}
  scalars = []
  errors = []
  for (path, x), s in zip(flat_x, flat_s):
    where = jax.tree_util.keystr(path)
    names = [_key_name(k) for k in path]
    slot = next((n for n in names if n in seen), None)
    if slot is not None:
      keys = tuple(k.key for k in path[names.index(slot) + 1:])
      if keys not in expected or param_shapes[keys] != x.shape:
        errors.append(f"{where}: {slot} leaf {x.shape} matches no parameter")
      elif s.spec != expected[keys]:
        errors.append(f"{where}: {s.spec}, but its parameter has {expected[keys]}")
      seen[slot] += 1
    elif s.spec != P():
      errors.append(f"{where} {x.shape}: {s.spec}; non-parameter leaves must be replicated P()")
    if x.ndim == 0:
      scalars.append(names[-1])
  num_params = len(expected)
  assert seen == {"params": num_params, "mu": num_params, "nu": num_params}, seen
  assert "count" in scalars and "step" in scalars, scalars  # the checks above saw them
  if errors:
    shown = errors[:MAX_ERRORS] + ([f"... and {len(errors) - MAX_ERRORS} more"]
                                   if len(errors) > MAX_ERRORS else [])
    pytest.fail(f"{len(errors)} train-state leaves of family={family!r} are sharded unlike "
                "their parameter (rules fsdp_tp):\n  " + "\n  ".join(shown), pytrace=False)
