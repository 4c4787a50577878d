"""Mesh creation, the rules applied to real params, sharded forward passes, shardings of train states."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clt.config import ConfigError, MeshConfig, ModelConfig
from clt.model import Transformer
from clt.sharding import batch_sharding, make_mesh, replicated, shardings_of, tree_shardings, use_mesh
from clt.step import create_model, resolve_dims

DIMS = resolve_dims(ModelConfig(preset="tiny"), 256)  # vocab a multiple of tensor=2
# Expected specs by the rules: embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor; head_dim, norm -> None.
EXPECTED = {
    "embed": P("tensor", "fsdp"),
    "q_proj": P("fsdp", "tensor", None),
    "k_proj": P("fsdp", "tensor", None),
    "o_proj": P("tensor", None, "fsdp"),
    "gate_proj": P("fsdp", "tensor"),
    "down_proj": P("tensor", "fsdp"),
    "scale": P(None),
}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def sharded_model(mesh):
    return create_model(DIMS, mesh, seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def one_device_model():
    return create_model(DIMS, make_mesh(MeshConfig(data=1), jax.devices()[:1]), seed=0, dtype=jnp.float32)


def by_name(state) -> dict:
    """Last path element -> leaf of the first layer (and the top level), for spot checks."""
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, NamedSharding)):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if 1 not in keys:  # layer 0 stands for all layers
            found.setdefault(next(k for k in reversed(keys) if isinstance(k, str) and k != "value"), leaf)
    return found


# ----------------------------------------------------------------------------------------------------------
def test_make_mesh_fills_the_minus_one_axis(mesh):
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3  # Explicit axes would break the embedding gather
    four = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices()[:4])
    assert dict(four.shape) == {"data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("cfg, pattern", [
    (MeshConfig(data=3, fsdp=2), r"mesh data=3 x fsdp=2 x tensor=1 = 6 does not divide 8 devices; make the "
                                 r"product 8, or set one axis to -1"),
    (MeshConfig(data=2, fsdp=2, tensor=1), r"mesh data=2 x fsdp=2 x tensor=1 = 4 does not match 8 devices"),
    (MeshConfig(data=-1, fsdp=-1), r"axis sizes are positive, with at most one -1"),
])
def test_make_mesh_rejects_a_bad_product(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make_mesh(cfg)


def test_params_are_sharded_as_the_rules_say(sharded_model, mesh):
    layer = sharded_model.layers[0]
    cases = [(sharded_model.embed, "embed"), (layer.attn.q_proj, "q_proj"), (layer.attn.o_proj, "o_proj"),
             (layer.mlp.gate_proj, "gate_proj"), (layer.mlp.down_proj, "down_proj"),
             (layer.attn_norm.scale, "scale")]
    for param, name in cases:
        value = param[...]
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, EXPECTED[name]), value.ndim), name
    # really split: a device holds a quarter of the embedding (vocab / tensor x d_model / fsdp)
    assert sharded_model.embed[...].addressable_shards[0].data.shape == (256 // 2, 64 // 2)


def test_sharded_forward_matches_one_device(sharded_model, one_device_model, mesh):
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, DIMS.vocab_size)
    expected = np.asarray(jax.jit(lambda t: one_device_model(t))(tokens))

    graphdef, state = nnx.split(sharded_model)
    with use_mesh(mesh):
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jax.device_put(tokens, batch_sharding(mesh)))
    assert logits.sharding.spec[0] == ("data", "fsdp")  # the batch stayed split over rows
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_create_model_depends_on_the_seed_only(sharded_model, one_device_model, mesh):
    same = jax.tree.map(np.array_equal, nnx.state(sharded_model), nnx.state(one_device_model))
    assert all(jax.tree.leaves(same))  # the same weights on 8 devices and on 1
    other = create_model(DIMS, mesh, seed=1, dtype=jnp.float32)
    assert not np.allclose(other.embed[...], sharded_model.embed[...])


def test_shardings_of_abstract_params_follows_the_rules(mesh):
    abstract = nnx.eval_shape(lambda: Transformer(DIMS, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    found = by_name(shardings_of(mesh, nnx.state(abstract)))
    for name, spec in EXPECTED.items():
        assert found[name] == NamedSharding(mesh, spec), name


def test_shardings_of_optimizer_state_mirrors_params(sharded_model, mesh):
    params = nnx.state(sharded_model, nnx.Param)
    opt_state = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0).init(params)
    shardings = shardings_of(mesh, {"params": params, "opt": opt_state})
    adam = shardings["opt"].inner_state[0]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(shardings["params"])
    assert jax.tree.leaves(adam.nu) == jax.tree.leaves(shardings["params"])
    assert adam.count == replicated(mesh) and shardings["opt"].hyperparams["learning_rate"] == replicated(mesh)
    assert by_name(adam.mu)["q_proj"] == NamedSharding(mesh, EXPECTED["q_proj"])


def test_tree_shardings_mirrors_params_in_plain_dicts(sharded_model, mesh):
    params = nnx.to_pure_dict(nnx.state(sharded_model, nnx.Param))  # annotations gone
    params_shardings = nnx.to_pure_dict(shardings_of(mesh, nnx.state(sharded_model, nnx.Param)))
    opt_state = optax.adamw(1e-3).init(params)
    shardings = tree_shardings(mesh, {"params": params, "opt": opt_state, "step": jnp.zeros(())}, params_shardings)
    assert shardings["params"] is params_shardings and shardings["opt"][0].mu is params_shardings
    assert shardings["opt"][0].count == replicated(mesh) and shardings["step"] == replicated(mesh)
    assert shardings["params"]["layers"][0]["mlp"]["down_proj"] == NamedSharding(mesh, EXPECTED["down_proj"])


def test_a_dim_that_does_not_divide_its_axis_is_a_clear_error(mesh):
    odd = dataclasses.replace(DIMS, d_ff=97)
    with pytest.raises(ConfigError, match=r"model.d_ff = 97: \['layers'\]\[0\]\['mlp'\]\['down_proj'\] dim 'mlp' = "
                                          r"97 does not divide mesh axes \('tensor',\) = 2 ways; make model.d_ff a "
                                          r"multiple of 2"):
        create_model(odd, mesh, seed=0, dtype=jnp.float32)


def test_the_vocabulary_is_padded_so_the_embedding_splits(mesh):
    """The byte tokenizer's 257 ids: 384 embedding rows shard over tensor=2; logits keep the 257 real ids."""
    model = create_model(dataclasses.replace(DIMS, vocab_size=257), mesh, seed=0, dtype=jnp.float32)
    assert model.embed.shape == (384, DIMS.d_model)
    with use_mesh(mesh):
        logits = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((4, 8), jnp.int32))
    assert logits.shape == (4, 8, 257)


def test_batch_rows_split_over_data_and_fsdp(mesh):
    batch = jax.device_put(np.zeros((8, 16), np.int32), batch_sharding(mesh))
    assert batch.addressable_shards[0].data.shape == (2, 16)  # 8 rows / (data 2 x fsdp 2), whole sequences
