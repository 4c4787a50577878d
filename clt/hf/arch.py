"""A Hugging Face `config.json` <-> clt's `model.*` fields, and where each weight lives in both layouts.

No jax here: `clt train` and `clt hf` check a model folder (architecture, RoPE type, sliding window) before
anything heavy starts. Supported: Llama 2/3 (with Llama 3.x `llama3` RoPE scaling), Mistral, Qwen2 (q/k/v
biases) and Qwen3 (q/k RMSNorm); all are the same decoder with the switches of `model.ModelDims`.

The weight layouts differ by reshapes and transposes only: HF stores a projection as (out, in), clt as
(in, heads, head_dim) or (heads, head_dim, out), and both rotate the two halves of each head in RoPE (HF's
`rotate_half`). `to_clt` and `from_clt` are numpy views where they can be, so a loader reads only the slice
each device needs; the vocabulary padding (clt's embedding rows) is added and cut here.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ROPE_TYPES = ("default", "llama3")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some checkpoints store that are derived, not learned: skipped on import."""


class HFError(ValueError):
    """A model folder clt cannot import as it is; the one-line message names the file or tensor and the fix."""


# ----------------------------------------------------------------------------------------------------------
# config.json -> model.* fields.
# ----------------------------------------------------------------------------------------------------------
def read_config(folder: str | pathlib.Path) -> dict:
    """The folder's config.json, parsed; a missing or malformed file is an HFError naming it."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise HFError(f"{folder}: no such folder; give a Hugging Face model folder (config.json, *.safetensors)")
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(f"{path}: missing; a Hugging Face model folder holds config.json next to its *.safetensors")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: not readable JSON ({e}); re-download or re-save the model") from None
    if not isinstance(config, dict):
        raise HFError(f"{path}: not a JSON object; re-download or re-save the model")
    return config


def _rope(config: dict, where: str) -> dict[str, Any]:
    """RoPE fields from either spelling: transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise HFError(f"{where}: rope_scaling type {kind!r} is not supported; clt implements {list(ROPE_TYPES)}")
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    fields: dict[str, Any] = dict(rope_theta=float(theta), rope_scaling="none")
    if kind == "llama3":
        try:
            fields.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                          rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]),
                          rope_original_context=int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise HFError(f"{where}: llama3 rope_scaling lacks {e.args[0]!r}; re-save the model's config") from None
    return fields


def model_fields(config: dict, where: str = "config.json") -> dict[str, Any]:
    """The `model.*` config fields that describe this Hugging Face model exactly (`preset` ""), or HFError."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise HFError(f"{where}: architecture {arch!r} is not supported; clt imports {', '.join(ARCHITECTURES)}")
    if config.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: hidden_act {config['hidden_act']!r} is not supported; clt's MLP is SwiGLU (silu)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        which = "attention_bias" if config.get("attention_bias") else "mlp_bias"
        raise HFError(f"{where}: {which}=true (biases on every projection) is not supported; clt has q/k/v "
                      "biases only (Qwen2)")
    if arch != "MistralForCausalLM" and config.get("use_sliding_window"):
        raise HFError(f"{where}: use_sliding_window=true (sliding attention in some layers) is not supported; "
                      "clt applies one window to every layer (Mistral's sliding_window)")
    try:
        n_heads = int(config["num_attention_heads"])
        d_model = int(config["hidden_size"])
        fields: dict[str, Any] = dict(
            preset="", vocab_size=int(config["vocab_size"]), d_model=d_model,
            n_layers=int(config["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or d_model // n_heads), d_ff=int(config["intermediate_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(config.get("sliding_window") or 0) if arch == "MistralForCausalLM" else 0,
            max_position_embeddings=int(config.get("max_position_embeddings") or 0))
    except KeyError as e:
        raise HFError(f"{where}: {e.args[0]!r} is missing; a {arch} config.json has it") from None
    except (TypeError, ValueError) as e:
        raise HFError(f"{where}: a size is not a number ({e}); re-save the model's config") from None
    fields.update(_rope(config, where))
    return fields


def special_ids(config: dict) -> tuple[int | None, int | None]:
    """(bos_token_id, eos_token_id) of a config.json; a list of EOS ids gives its first."""
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return bos, eos


# ----------------------------------------------------------------------------------------------------------
# model dims -> config.json.
# ----------------------------------------------------------------------------------------------------------
def architecture_of(dims: Any) -> str:
    """The HF class that has exactly these switches: q/k norm is Qwen3, q/k/v biases Qwen2, a sliding window
    Mistral, and plain Llama otherwise (any of them loads an unswitched model the same way)."""
    if dims.qk_norm and not dims.qkv_bias:
        return "Qwen3ForCausalLM"
    if dims.qkv_bias and not dims.qk_norm:
        return "Qwen2ForCausalLM"
    if dims.qkv_bias or dims.qk_norm:
        raise HFError("a model with both q/k/v biases and q/k norm has no Hugging Face architecture to export to")
    return "MistralForCausalLM" if dims.sliding_window else "LlamaForCausalLM"


def hf_config(dims: Any, *, max_position_embeddings: int, bos_id: int | None, eos_id: int | None,
              dtype: str) -> dict:
    """config.json for `dims` (a model.ModelDims): readable by transformers 4.x and 5.x (`rope_theta` and
    `rope_scaling`, which 5.x turns into its `rope_parameters`)."""
    arch = architecture_of(dims)
    rope_scaling = None
    if dims.rope_scaling == "llama3":
        rope_scaling = dict(rope_type="llama3", factor=dims.rope_factor, low_freq_factor=dims.rope_low_freq_factor,
                            high_freq_factor=dims.rope_high_freq_factor,
                            original_max_position_embeddings=dims.rope_original_context)
    config = dict(
        architectures=[arch], model_type=arch.removesuffix("ForCausalLM").lower(), vocab_size=dims.vocab_size,
        hidden_size=dims.d_model, intermediate_size=dims.d_ff, num_hidden_layers=dims.n_layers,
        num_attention_heads=dims.n_heads, num_key_value_heads=dims.n_kv_heads, head_dim=dims.head_dim,
        hidden_act="silu", max_position_embeddings=max_position_embeddings, rms_norm_eps=dims.norm_eps,
        rope_theta=dims.rope_theta, rope_scaling=rope_scaling, tie_word_embeddings=dims.tie_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype=dtype, use_cache=True)
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        config.update(attention_bias=False)
    if arch == "LlamaForCausalLM":
        config.update(mlp_bias=False)
    if arch == "MistralForCausalLM":
        config.update(sliding_window=dims.sliding_window)
    if arch.startswith("Qwen"):
        config.update(use_sliding_window=False, sliding_window=None)
    return config


# ----------------------------------------------------------------------------------------------------------
# Weights: HF tensor name <-> clt param path, and the layout change between them.
# ----------------------------------------------------------------------------------------------------------
def weight_names(dims: Any) -> dict[tuple, tuple[str, str]]:
    """{clt param path: (HF tensor name, layout kind)} for every param of a model with these dims."""
    names: dict[tuple, tuple[str, str]] = {("embed",): ("model.embed_tokens.weight", "embed"),
                                           ("final_norm", "scale"): ("model.norm.weight", "copy")}
    if not dims.tie_embeddings:
        names[("unembed",)] = ("lm_head.weight", "unembed")
    for i in range(dims.n_layers):
        hf = f"model.layers.{i}"
        names[("layers", i, "attn_norm", "scale")] = (f"{hf}.input_layernorm.weight", "copy")
        names[("layers", i, "mlp_norm", "scale")] = (f"{hf}.post_attention_layernorm.weight", "copy")
        for p in "qkv":
            names[("layers", i, "attn", f"{p}_proj")] = (f"{hf}.self_attn.{p}_proj.weight", "in_heads")
            if dims.qkv_bias:
                names[("layers", i, "attn", f"{p}_bias")] = (f"{hf}.self_attn.{p}_proj.bias", "heads")
        names[("layers", i, "attn", "o_proj")] = (f"{hf}.self_attn.o_proj.weight", "heads_out")
        if dims.qk_norm:
            for p in "qk":
                names[("layers", i, "attn", f"{p}_norm", "scale")] = (f"{hf}.self_attn.{p}_norm.weight", "copy")
        for p in ("gate", "up", "down"):
            names[("layers", i, "mlp", f"{p}_proj")] = (f"{hf}.mlp.{p}_proj.weight", "transpose")
    return names


def hf_shape(kind: str, clt_shape: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """The HF tensor's shape for a clt param of `clt_shape` (padding rows cut)."""
    if kind == "embed":
        return (vocab_size, clt_shape[1])
    if kind == "unembed":
        return (vocab_size, clt_shape[0])
    if kind == "in_heads":  # (d, n, h) <- (n*h, d)
        return (clt_shape[1] * clt_shape[2], clt_shape[0])
    if kind == "heads_out":  # (n, h, d) <- (d, n*h)
        return (clt_shape[2], clt_shape[0] * clt_shape[1])
    if kind == "heads":  # (n, h) <- (n*h,)
        return (clt_shape[0] * clt_shape[1],)
    if kind == "transpose":
        return clt_shape[::-1]
    return clt_shape


def to_clt(kind: str, hf: np.ndarray, clt_shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor in clt's layout, as a view where numpy allows (the vocabulary still unpadded)."""
    if kind == "embed":
        return hf
    if kind in ("unembed", "transpose"):
        return hf.T
    if kind == "in_heads":
        d, n, h = clt_shape
        return hf.reshape(n, h, d).transpose(2, 0, 1)
    if kind == "heads_out":
        n, h, d = clt_shape
        return hf.reshape(d, n, h).transpose(1, 2, 0)
    if kind == "heads":
        return hf.reshape(clt_shape)
    return hf


def from_clt(kind: str, param: np.ndarray, vocab_size: int) -> np.ndarray:
    """A clt param (whole, on the host) in the HF layout, the vocabulary padding cut (C-contiguous)."""
    if kind == "embed":
        out = param[:vocab_size]
    elif kind == "unembed":
        out = param[:, :vocab_size].T
    elif kind == "transpose":
        out = param.T
    elif kind == "in_heads":
        d, n, h = param.shape
        out = param.transpose(1, 2, 0).reshape(n * h, d)
    elif kind == "heads_out":
        n, h, d = param.shape
        out = param.transpose(2, 0, 1).reshape(d, n * h)
    elif kind == "heads":
        out = param.reshape(-1)
    else:
        out = param
    return np.ascontiguousarray(out)
