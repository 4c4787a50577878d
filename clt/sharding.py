"""Device mesh, the logical->mesh axis rules, and the shardings of params, optimizer state and batches.

Mesh axes are (data, fsdp, tensor), all `AxisType.Auto`: with Explicit axes (jax.make_mesh's default) the
embedding gather and the cross-entropy fail to shard. One rule table maps the model's logical axis names:
- batch -> (data, fsdp): both axes split the batch; they differ only in what else they split.
- embed -> fsdp: ZeRO-3 style, every weight with a d_model dim is split over fsdp and gathered per layer;
  pure data parallelism (fsdp=1) keeps full replicas.
- mlp, heads, kv_heads, vocab -> tensor: Megatron-style tensor parallelism; a weight's "other" dim.
- head_dim, norm -> replicated: small, and splitting head_dim would cut RoPE's half-rotation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from clt.config import ConfigError, MeshConfig
from clt.model import ModelDims, Transformer

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
)
# The config field to blame when a dim does not divide its mesh axes.
_FIELD_OF = {"embed": "d_model", "mlp": "d_ff", "heads": "n_heads", "kv_heads": "n_kv_heads", "vocab": "vocab_size"}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one axis may be -1 = the rest."""
    cfg.check("mesh")  # positive sizes, at most one -1
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    known = math.prod(s for s in sizes.values() if s != -1)
    text = " x ".join(f"{k}={v}" for k, v in sizes.items())
    if len(devices) % known or (-1 not in sizes.values() and known != len(devices)):
        problem = "does not divide" if len(devices) % known else "does not match"
        raise ConfigError("mesh", sizes, f"mesh {text} = {known} {problem} {len(devices)} devices",
                          f"make the product {len(devices)}, or set one axis to -1 (e.g. mesh.data=-1)")
    shape = tuple(len(devices) // known if s == -1 else s for s in sizes.values())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """Set the mesh and the rules: needed to trace the model so its activation constraints apply."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches (b, t): rows over (data, fsdp), the sequence whole on each device."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shardings_of(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for any pytree: annotated nnx Variables follow the rules, other arrays are replicated.

    Works on params (concrete or from `nnx.eval_shape`) and on whole train states: optax builds moments by
    mapping over an nnx.State, so each moment is a Param with its param's annotation and shards like it,
    while counts and hyperparameters are plain arrays and come out replicated. A dim that does not divide
    its mesh axes is a ConfigError naming the config field (JAX's own IndivisibleError names neither).
    """
    with nnx.logical_axis_rules(LOGICAL_RULES):
        shardings = nnx.get_named_sharding(tree, mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for path, var in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_var):
        if is_var(var):
            _check_divisible(mesh, jax.tree_util.keystr(path), var)
    return shardings


def tree_shardings(mesh: Mesh, tree: Any, params_shardings: Any) -> Any:
    """Shardings for a tree whose optimizer moments lost their annotations (e.g. plain dicts).

    Every subtree with the structure of `params_shardings` (and matching ranks) gets those shardings,
    so moments mirror their params; every other leaf is replicated (step counts, hyperparameters).
    Prefer `shardings_of` when the tree still holds nnx Variables.
    """
    params_def = jax.tree.structure(params_shardings)
    specs = jax.tree.leaves(params_shardings)

    def mirrors_params(node: Any) -> bool:
        treedef = jax.tree.structure(node)
        return (not jax.tree_util.treedef_is_leaf(treedef) and treedef == params_def
                and all(len(s.spec) <= getattr(x, "ndim", -1) for s, x in zip(specs, jax.tree.leaves(node))))

    return jax.tree.map(lambda node: params_shardings if mirrors_params(node) else replicated(mesh),
                        tree, is_leaf=mirrors_params)


def create_model(dims: ModelDims, mesh: Mesh, *, seed: int, **model_kwargs: Any) -> Transformer:
    """The model initialised directly into its shards: a jitted init with the rules' out_shardings, so
    no device ever holds a full replica. The same seed gives the same weights on any mesh (JAX's
    partitionable threefry draws each element independently of the layout)."""
    def init(key: jax.Array) -> nnx.State:
        return nnx.state(Transformer(dims, rngs=nnx.Rngs(key), **model_kwargs))

    key = jax.random.key(seed)  # an argument, not a constant: one compiled init serves every seed
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(dims, rngs=nnx.Rngs(0), **model_kwargs)))
    with use_mesh(mesh):
        state = jax.jit(init, in_shardings=replicated(mesh), out_shardings=shardings_of(mesh, abstract_state))(key)
    return nnx.merge(graphdef, state)


def _check_divisible(mesh: Mesh, where: str, var: nnx.Variable) -> None:
    names = var.get_metadata().get("out_sharding") or ()
    rules = dict(LOGICAL_RULES)
    for name, size in zip(names, var.shape):
        axes = rules.get(name)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            field = _FIELD_OF.get(name, name)
            raise ConfigError(f"model.{field}", size,
                              f"{where} dim {name!r} = {size} does not divide mesh axes {axes} = {ways} ways",
                              f"make model.{field} a multiple of {ways} (pad the vocab) or shrink those mesh axes")
