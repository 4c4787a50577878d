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

from clt.config import Config, ConfigError, MeshConfig
from clt.model import ModelDims
from clt.plan import Plan

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


def mesh_axis_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes on `n_devices`, the -1 axis filled in.

    The one check of a mesh against a device count: `make_mesh` (on the real devices) and `check_layout`
    (`clt plan show --devices N`, for a machine that is not this one) both call it.
    """
    cfg.check("mesh")  # positive sizes, at most one -1
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    given = {k: v for k, v in sizes.items() if v != -1}
    known = math.prod(given.values())
    if n_devices % known or (-1 not in sizes.values() and known != n_devices):
        problem = "does not divide" if n_devices % known else "does not match"
        text = " x ".join(f"{k}={v}" for k, v in given.items())
        rest = next((f" ({k}=-1 takes the rest)" for k, v in sizes.items() if v == -1), "")
        blamed = [k for k, v in given.items() if v > 1]
        path, value = (f"mesh.{blamed[0]}", sizes[blamed[0]]) if len(blamed) == 1 else ("mesh", sizes)
        if len(blamed) == 1 and rest:
            fix = f"use a {path} that divides {n_devices}: {_divisors(n_devices)}"
        elif rest:
            fix = f"make the product of the other axes divide {n_devices}"
        else:
            fix = f"make the product {n_devices}, or set one axis to -1 (e.g. mesh.data=-1)"
        raise ConfigError(path, value, f"mesh {text} = {known} {problem} {n_devices} devices{rest}", fix)
    return {k: n_devices // known if v == -1 else v for k, v in sizes.items()}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one axis may be -1 = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(mesh_axis_sizes(cfg, len(devices)).values())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _divisors(n: int, limit: int = 8) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, found[:limit])) + (", ..." if len(found) > limit else "")


def check_layout(cfg: Config, plan: Plan, n_devices: int | None, dims: ModelDims, vocab_known: bool = True) -> None:
    """Everything about the mesh, the model's shape and the batch sizes that must divide, checked before
    anything is compiled, with the config field to change; raises ConfigError.

    `n_devices` is the machine's device count (`jax.device_count()` at train time, `--devices N` in `clt plan
    show`); None checks only what needs no device count (an axis given as -1 is then unknown). `dims` is the
    model's shape; `vocab_known=False` leaves its vocabulary unchecked (it follows the data, which `clt plan
    show` does not read).
    """
    vocab = dims.padded_vocab if vocab_known else None
    if n_devices is not None:
        sizes: dict[str, int | None] = dict(mesh_axis_sizes(cfg.mesh, n_devices))
    else:
        cfg.mesh.check("mesh")
        sizes = {k: None if v == -1 else v for k, v in (("data", cfg.mesh.data), ("fsdp", cfg.mesh.fsdp),
                                                         ("tensor", cfg.mesh.tensor))}
    # Weights: tensor splits heads, kv heads, d_ff and the vocabulary; fsdp splits d_model (see LOGICAL_RULES).
    tensor, fsdp = sizes["tensor"], sizes["fsdp"]
    if tensor is not None and tensor > 1:
        split = {"model.n_heads": dims.n_heads, "model.n_kv_heads": dims.n_kv_heads, "model.d_ff": dims.d_ff}
        for field, size in split.items():
            if size % tensor:
                all_of = ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in split.items())
                raise ConfigError("mesh.tensor", tensor, f"does not divide {field} = {size} (tensor parallelism "
                                  "splits the heads, kv heads and d_ff)", f"use a mesh.tensor that divides "
                                  f"{all_of}: {_divisors(math.gcd(*split.values()))}; or change {field}")
        if vocab is not None and vocab % tensor:
            raise ConfigError("mesh.tensor", tensor, f"does not divide the embedding's {vocab} rows (the vocabulary "
                              "padded to a multiple of 128)", f"use a divisor of {vocab}: {_divisors(vocab)}")
    if fsdp is not None and fsdp > 1 and dims.d_model % fsdp:
        raise ConfigError("mesh.fsdp", fsdp, f"does not divide model.d_model = {dims.d_model} (fsdp splits every "
                          "weight along d_model)", f"use a divisor of {dims.d_model}: {_divisors(dims.d_model)}")

    # Batches: rows split over data x fsdp, and each micro-batch of grad_accum must split the same way.
    ways = sizes["data"] * sizes["fsdp"] if sizes["data"] is not None and sizes["fsdp"] is not None else None
    accum = cfg.optim.grad_accum
    own_batch = {ph.name for ph in cfg.phases if ph.batch_size is not None}
    for p in plan.phases:
        field = f"phases.{p.name}.batch_size" if p.name in own_batch else "batch_size"
        batch = p.batch_size
        if batch % accum:
            raise ConfigError("optim.grad_accum", accum, f"does not divide {field} = {batch}",
                              f"use a divisor of {batch}: {_divisors(batch)}")
        if ways is None or ways == 1:
            continue
        if batch % ways:
            raise ConfigError(field, batch, f"does not split over data x fsdp = {sizes['data']} x {sizes['fsdp']} "
                              f"= {ways} devices", f"use a multiple of {ways}, e.g. {-(-batch // ways) * ways}")
        if (batch // accum) % ways:
            fits = [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % ways == 0]
            raise ConfigError("optim.grad_accum", accum, f"micro-batches of {field} / grad_accum = {batch // accum} "
                              f"rows do not split over data x fsdp = {ways} devices",
                              f"use a grad_accum of {', '.join(map(str, fits[:8]))}")
    if ways is not None and cfg.data.eval_batch % ways:
        raise ConfigError("data.eval_batch", cfg.data.eval_batch, f"does not split over data x fsdp = "
                          f"{sizes['data']} x {sizes['fsdp']} = {ways} devices",
                          f"use a multiple of {ways}, e.g. {-(-cfg.data.eval_batch // ways) * ways}")


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
                              f"make model.{field} a multiple of {ways} or shrink those mesh axes")
