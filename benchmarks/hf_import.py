"""Host memory of a Hugging Face import: does it stream (one tensor, one device block at a time)?

Writes a random Llama-shaped safetensors folder of about --gib GiB (bfloat16 on disk, as published models
are), then imports it onto every local device with fsdp and reports the peak *anonymous* host memory
(RssAnon, sampled every 5 ms: the memory-mapped file's pages are page cache, not the process's) against the
size of the float32 params it builds. On CPU the devices' memory is host memory, so the params themselves
are counted once; a loader that materialised whole tensors (or the whole file) on the host first would add
one more copy of the largest tensor (or of the model).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        .venv/bin/python benchmarks/hf_import.py --gib 1
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step import command_line, machine_info, stamp, write_result  # noqa: E402  (benchmarks/step.py)


def rss_anon() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = rss_anon(), False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.005)


def write_model(folder: pathlib.Path, gib: float) -> dict:
    """A Llama-3-like shape (d_model 2048, d_ff 8192, GQA 32/8, vocab 32000) with as many layers as fit."""
    import ml_dtypes

    from clt.hf.safetensors import write_sharded

    d, f, n, k, v = 2048, 8192, 32, 8, 32000
    layer = 2 * (d * d + 2 * d * (d * k // n) + 3 * d * f)  # bytes in bf16
    layers = max(1, int((gib * 2**30 - 2 * 2 * v * d) / layer))
    config = dict(architectures=["LlamaForCausalLM"], hidden_size=d, intermediate_size=f, num_attention_heads=n,
                  num_key_value_heads=k, num_hidden_layers=layers, vocab_size=v, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=4096)
    h = d // n
    shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                       f"{p}.self_attn.q_proj.weight": (n * h, d), f"{p}.self_attn.k_proj.weight": (k * h, d),
                       f"{p}.self_attn.v_proj.weight": (k * h, d), f"{p}.self_attn.o_proj.weight": (d, n * h),
                       f"{p}.mlp.gate_proj.weight": (f, d), f"{p}.mlp.up_proj.weight": (f, d),
                       f"{p}.mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    tensors = [(name, shape, bf16, lambda shape=shape: (0.02 * rng.standard_normal(shape, np.float32)).astype(bf16))
               for name, shape in shapes.items()]
    folder.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors, folder, max_shard_bytes=2 * 10**9)
    (folder / "config.json").write_text(json.dumps(config))
    return dict(layers=layers, params=sum(int(np.prod(s)) for s in shapes.values()),
                largest=max(int(np.prod(s)) for s in shapes.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the bf16 safetensors folder")
    ap.add_argument("--folder", help="where to write it (default: a temporary folder)")
    ap.add_argument("--out", help="result JSON (default: benchmarks/results/hf_import-<date>.json)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(args.folder or tmp) / "model"
        t0 = time.perf_counter()
        shape = write_model(folder, args.gib)
        written = time.perf_counter() - t0

        import jax

        from clt.config import MeshConfig
        from clt.hf import convert
        from clt.sharding import make_mesh

        n = jax.device_count()
        jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory, before the baseline
        base = rss_anon()
        peak = Peak()
        peak.start()
        t0 = time.perf_counter()
        model = convert.import_model(folder, mesh=make_mesh(MeshConfig(data=1, fsdp=n, tensor=1)))
        jax.block_until_ready(jax.tree.leaves(model))
        took = time.perf_counter() - t0
        peak.stop = True
        peak.join()
        params_bytes = 4 * shape["params"]
        extra = peak.peak - base - params_bytes
        result = dict(command=command_line(), machine=machine_info(), devices=n, layers=shape["layers"],
                      params_m=round(shape["params"] / 1e6, 1),
                      file_gib=round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30, 2),
                      write_s=round(written, 1), import_s=round(took, 1), params_f32_gib=round(params_bytes / 2**30, 2),
                      peak_anon_above_baseline_gib=round((peak.peak - base) / 2**30, 2),
                      beyond_params_mib=round(extra / 2**20, 1),
                      largest_tensor_f32_mib=round(4 * shape["largest"] / 2**20, 1))
        print(json.dumps({k: v for k, v in result.items() if k not in ("command", "machine")}))
        print(write_result(result, args.out, f"hf_import-{stamp()}.json"))


if __name__ == "__main__":
    main()
