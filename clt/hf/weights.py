"""Hugging Face safetensors weights onto a mesh, one tensor at a time, and back out.

Each param is built with `jax.make_array_from_callback`: every device asks for its own block, which is read
from the memory-mapped file through the layout views of `arch.to_clt`. No host ever holds a whole model, nor
a device a whole tensor it only shards, so a model larger than one device (or than the host's free memory
twice over) loads. Before anything is read, the folder's tensors must be exactly the ones the config implies,
with the shapes it implies: a missing or extra tensor is an error, never a silent random init.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
import tqdm
from flax import nnx

from clt.hf.arch import IGNORED_SUFFIXES, HFError, from_clt, hf_shape, to_clt, weight_names
from clt.hf.safetensors import TensorSet
from clt.model import ModelDims


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _listed(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tensors(tensors: TensorSet, dims: ModelDims, abstract: dict, where: str) -> None:
    """The folder holds exactly the tensors `dims` needs, each of the shape the config implies (HFError)."""
    expected = {hf: (kind, path) for path, (hf, kind) in weight_names(dims).items()}
    present = {n for n in tensors.names if not n.endswith(IGNORED_SUFFIXES)}
    if dims.tie_embeddings:
        present.discard("lm_head.weight")  # tied: transformers ignores a stored copy too
    missing, extra = sorted(expected.keys() - present), sorted(present - expected.keys())
    if missing or extra:
        parts = [f"missing {_listed(missing)}" if missing else "", f"unexpected {_listed(extra)}" if extra else ""]
        raise HFError(f"{where}: the tensors do not match config.json ({'; '.join(p for p in parts if p)}); "
                      "check that config.json belongs to these weights")
    for name, (kind, path) in expected.items():
        want = hf_shape(kind, _get(abstract, path).shape, dims.vocab_size)
        got = tuple(tensors.shape(name))
        if got != want:
            raise HFError(f"{where}: tensor {name} has shape {list(got)} but config.json implies {list(want)}; "
                          "check that config.json belongs to these weights")


def _block_reader(view: np.ndarray, shape: tuple[int, ...], dtype: Any) -> Callable:
    """The callback for make_array_from_callback: one device's block of the padded param, read from `view`."""

    def read(index: tuple) -> np.ndarray:
        bounds = [s.indices(n) for s, n in zip(index, shape)]
        block = tuple(slice(start, stop) for start, stop, _ in bounds)
        inside = tuple(slice(min(start, n), min(stop, n)) for (start, stop, _), n in zip(bounds, view.shape))
        part = np.asarray(view[inside], dtype=dtype)
        want = tuple(b.stop - b.start for b in block)
        if part.shape == want:
            return part
        out = np.zeros(want, dtype)  # the vocabulary padding: rows no token id reaches
        out[tuple(slice(0, k) for k in part.shape)] = part
        return out

    return read


def load_params(folder: str | pathlib.Path, dims: ModelDims, abstract_params: nnx.State, shardings: nnx.State,
                *, progress: bool = False) -> nnx.State:
    """The folder's weights as params shaped like `abstract_params`, each placed straight into its sharding."""
    tensors = TensorSet(folder)
    abstract, target = nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(shardings)
    check_tensors(tensors, dims, abstract, str(folder))
    names = weight_names(dims)
    loaded = jax.tree.map(lambda x: None, abstract)
    for path, (hf, kind) in tqdm.tqdm(names.items(), desc="load weights", unit="tensor", disable=not progress):
        spec = _get(abstract, path)
        view = to_clt(kind, tensors.array(hf), spec.shape)
        _set(loaded, path, jax.make_array_from_callback(spec.shape, _get(target, path),
                                                        _block_reader(view, spec.shape, spec.dtype)))
    unfilled = [p for p, x in jax.tree_util.tree_flatten_with_path(loaded, is_leaf=lambda x: x is None)[0]
                if x is None]
    if unfilled:  # a param no tensor maps to would otherwise keep a random init
        raise HFError(f"{folder}: no Hugging Face tensor maps to clt params {unfilled[:3]}; this is a clt bug")
    state = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(state, loaded)
    return state


def hf_tensors(params: nnx.State, dims: ModelDims, dtype: Any) -> Iterator[tuple[str, tuple, np.dtype, Callable]]:
    """(HF name, shape, dtype, thunk) for every param, for safetensors.write_sharded: each thunk gathers one
    param to the host, cuts the vocabulary padding and changes the layout, so one tensor is in memory at a time."""
    pure = nnx.to_pure_dict(params)
    dtype = np.dtype(dtype)
    for path, (hf, kind) in weight_names(dims).items():
        param = _get(pure, path)
        shape = hf_shape(kind, param.shape, dims.vocab_size)

        def thunk(param=param, kind=kind) -> np.ndarray:
            return from_clt(kind, np.asarray(jax.device_get(param)), dims.vocab_size).astype(dtype)

        yield hf, shape, dtype, thunk
