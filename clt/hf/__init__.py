"""Hugging Face models in and out: safetensors files, config.json mapping, weight conversion.

`clt.hf.import_model(path)` and `clt.hf.export_model(model, config, out_dir)` live in clt/hf/convert.py; they are
loaded on first use, so `clt.hf.arch` (which the command line reads before jax starts) stays light.
"""

from typing import Any

__all__ = ["import_model", "export_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from clt.hf import convert
        return getattr(convert, name)
    raise AttributeError(f"module 'clt.hf' has no attribute {name!r}")
