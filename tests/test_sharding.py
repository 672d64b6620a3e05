"""Mesh construction and logical-axis rules."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from metalm_jax import sharding


def test_make_mesh_fills_and_uses_auto_axes(devices8):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}, devices8)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape,match", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices but 8"),
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"data": -1, "fsdp": 3}, "not divisible"),
    ({"dat": 8}, "unknown axes"),
])
def test_make_mesh_errors(devices8, shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(shape, devices8)


def test_logical_to_mesh_spec(devices8):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices8)
  rules = sharding.FSDP_TP_RULES
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules, mesh, (8, 6)) == P("fsdp", "tensor")
  # 'mlp' of size 5 is not divisible by tensor=2: replicated rather than an error.
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules, mesh, (8, 5)) == P("fsdp")
  assert sharding.logical_to_mesh_spec(("batch", None), rules) == P(("data", "fsdp"))
  # An axis that no rule names is replicated.
  assert sharding.logical_to_mesh_spec(("head_dim",), rules, mesh, (4,)) == P()
  # A mesh axis is never used twice in one spec.
  assert sharding.logical_to_mesh_spec(("heads", "mlp"), rules, mesh, (4, 4)) == P("tensor")


def test_malformed_rules_are_errors():
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.logical_to_mesh_spec(("embed",), (("embed", "fsdpp"),))
  with pytest.raises(ValueError, match="twice"):
    sharding.logical_to_mesh_spec(("embed",), (("embed", "fsdp"), ("embed", "data")))
