"""Hugging Face folders <-> clt: the Python API (`import_model`, `export_model`) and `clt hf import|export`.

An import is checked before it is read (architecture, RoPE type, every tensor's name and shape) and placed
straight into its shardings (clt/hf/weights.py). An export writes `config.json`, safetensors sharded at 5 GB
with an index, and the tokenizer files of the run's data, into a temporary folder renamed when complete, so
a crash never leaves a half-written model where `from_pretrained` would read it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clt import sharding, step
from clt.checkpoint import CheckpointStore, load_init_weights, open_source, recorded_model_fields
from clt.config import CheckpointConfig, Config, ConfigError, MeshConfig, ModelConfig
from clt.data.tokenizer import load_tokenizer, write_hf_tokenizer
from clt.hf.arch import HFError, hf_config, model_fields, read_config
from clt.hf.safetensors import write_sharded
from clt.hf.weights import hf_tensors, load_params
from clt.model import ModelDims, Transformer
from clt.resume import MODEL_SHAPE_FIELDS

log = logging.getLogger("clt")

SHARD_BYTES = 5 * 10**9
"""Safetensors files are cut at this size, as `transformers.save_pretrained` does by default."""


def _mesh_for(dims: ModelDims) -> jax.sharding.Mesh:
    """Every local device with the weights split over fsdp when d_model allows it (a big model fits), else one."""
    n = jax.device_count()
    if n > 1 and dims.d_model % n == 0:
        return sharding.make_mesh(MeshConfig(data=1, fsdp=n, tensor=1))
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def _abstract(dims: ModelDims, mesh: jax.sharding.Mesh, dtype: Any, param_dtype: Any
              ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: Transformer(dims, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), rngs=nnx.Rngs(0))))
    return graphdef, abstract, sharding.shardings_of(mesh, abstract)


def hf_dims(path: str | pathlib.Path) -> tuple[ModelConfig, ModelDims]:
    """The `model.*` fields and the resolved dims of a Hugging Face folder (HFError when unsupported)."""
    fields = model_fields(read_config(path), f"{path}/config.json")
    model_cfg = ModelConfig(**fields)
    return model_cfg, step.resolve_dims(model_cfg, fields["vocab_size"])


def import_model(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None, dtype: str = "float32",
                 param_dtype: str = "float32", progress: bool = False) -> Transformer:
    """The clt model of a Hugging Face folder; calling it on int ids [B, T] gives logits [B, T, vocab].

    `mesh` (default: one device) decides where each weight lives; each device reads only its shard."""
    _, dims = hf_dims(path)
    mesh = mesh or sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    graphdef, abstract, shardings = _abstract(dims, mesh, dtype, param_dtype)
    return nnx.merge(graphdef, load_params(path, dims, abstract, shardings, progress=progress))


# ----------------------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------------------
def _staged(out_dir: pathlib.Path) -> pathlib.Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HFError(f"{out_dir}: exists and is not empty; give a new folder (an export never overwrites)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"


def write_folder(params: nnx.State, dims: ModelDims, out_dir: str | pathlib.Path, *, dtype: str,
                 max_position_embeddings: int, tokenizer: str | None, max_shard_bytes: int = SHARD_BYTES,
                 progress: bool = False) -> dict:
    """A Hugging Face model folder from clt params: config.json, generation_config.json, safetensors (one
    tensor in memory at a time) and, when `tokenizer` names one ("byte", a tokenizer.json, an HF folder),
    its tokenizer files. Returns a summary."""
    out_dir = pathlib.Path(out_dir)
    staging = _staged(out_dir)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else (None, None)
    try:
        staging.mkdir()
        tensors = list(hf_tensors(params, dims, jnp.dtype(dtype)))
        files = write_sharded(tensors, staging, max_shard_bytes=max_shard_bytes)
        config = hf_config(dims, max_position_embeddings=max_position_embeddings, bos_id=bos, eos_id=eos, dtype=dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer_files = write_hf_tokenizer(tokenizer, staging) if tokenizer else []
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dict(out=str(out_dir), architecture=config["architectures"][0], files=len(files), dtype=dtype,
                tokenizer=tokenizer, tokenizer_files=tokenizer_files)


def export_model(model: Transformer, config: Config | ModelConfig, out_dir: str | pathlib.Path, *,
                 dtype: str = "float32", tokenizer: str | None = None, max_shard_bytes: int = SHARD_BYTES) -> dict:
    """Write `model` as a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `config` gives the context length to advertise (model.max_position_embeddings, else data.seq_len);
    `tokenizer` ("byte", a tokenizer.json or an HF folder) adds the tokenizer files."""
    model_cfg = config.model if isinstance(config, Config) else config
    context = model_cfg.max_position_embeddings or (config.data.seq_len if isinstance(config, Config) else 0)
    return write_folder(nnx.state(model, nnx.Param), model.dims, out_dir, dtype=dtype,
                        max_position_embeddings=context or 4096, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def export_checkpoint(source: str, out_dir: str | pathlib.Path, *, dtype: str | None = None,
                      max_shard_bytes: int = SHARD_BYTES, progress: bool = False) -> dict:
    """`clt hf export`: the params of WORKDIR[@STEP] (or a checkpoint folder) as a Hugging Face folder."""
    spec = f"ckpt:{source}"
    store, chosen = open_source(spec, CheckpointConfig())
    try:
        meta = store.meta(chosen)
    finally:
        store.close()
    recorded = meta.get("config", {})
    model_cfg = dataclasses.replace(ModelConfig(), **recorded_model_fields(meta))
    dims = step.resolve_dims(model_cfg, model_cfg.vocab_size)
    param_dtype = recorded.get("model", {}).get("param_dtype", "float32")
    mesh = _mesh_for(dims)
    _, abstract, shardings = _abstract(dims, mesh, "float32", param_dtype)
    params = load_init_weights(f"ckpt:{store.directory}@{chosen}", dims, abstract, shardings, CheckpointConfig())
    tokenizer = meta.get("tokenizer") or {}
    spec_tok = tokenizer.get("files") or tokenizer.get("name")
    if spec_tok and spec_tok != "byte" and not pathlib.Path(spec_tok).exists():
        log.warning("the run's tokenizer %s is gone: exporting the model without tokenizer files", spec_tok)
        spec_tok = None
    if not spec_tok:
        log.warning("checkpoint %d records no tokenizer: exporting the model without tokenizer files", chosen)
    context = model_cfg.max_position_embeddings or recorded.get("data", {}).get("seq_len", 0) or 4096
    summary = write_folder(params, dims, out_dir, dtype=dtype or param_dtype, max_position_embeddings=context,
                           tokenizer=spec_tok, max_shard_bytes=max_shard_bytes, progress=progress)
    return dict(summary, step=chosen, source=str(store.directory))


# ----------------------------------------------------------------------------------------------------------
# Import into a workdir.
# ----------------------------------------------------------------------------------------------------------
def import_to_workdir(path: str | pathlib.Path, workdir: str | pathlib.Path, *, progress: bool = False) -> dict:
    """`clt hf import`: the folder's weights as checkpoint 0 of `workdir` (params only, no optimizer), with
    its model fields and tokenizer recorded, so `init_from="ckpt:WORKDIR"` starts from it and `clt hf export`
    writes it back."""
    path, wd = pathlib.Path(path).absolute(), pathlib.Path(workdir)
    model_cfg, dims = hf_dims(path)
    if (wd / "checkpoints").is_dir() and any((wd / "checkpoints").iterdir()):
        raise ConfigError("OUT_WORKDIR", str(wd), "already holds checkpoints", "give a new folder")
    mesh = _mesh_for(dims)
    _, abstract, shardings = _abstract(dims, mesh, "float32", "float32")
    params = load_params(path, dims, abstract, shardings, progress=progress)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tok = load_tokenizer(str(path))
        files = write_hf_tokenizer(str(path), _fresh(wd / "tokenizer"))
        tokenizer = dict(name=tok.name, fingerprint=tok.fingerprint, files=str((wd / "tokenizer").absolute()))
        log.info("copied the tokenizer (%s) to %s", ", ".join(files), wd / "tokenizer")
    meta = dict(source=f"hf:{path}", init_from="", tokenizer=tokenizer,
                model=dict(preset="", param_dtype="float32", **{k: getattr(dims, k) for k in MODEL_SHAPE_FIELDS}),
                config=dict(model=dataclasses.asdict(model_cfg)))
    store = CheckpointStore(wd / "checkpoints", CheckpointConfig(async_save=False))
    try:
        store.save(0, {"params": params}, meta)
        store.wait()
    finally:
        store.close()
    return dict(workdir=str(wd), source=str(path), params=sum(x.size for x in jax.tree.leaves(params)),
                architecture=read_config(path)["architectures"][0], tokenizer=tokenizer and tokenizer["name"])


def _fresh(folder: pathlib.Path) -> pathlib.Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder
