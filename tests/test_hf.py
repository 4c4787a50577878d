"""Hugging Face import/export against `transformers` itself: tiny Llama (also with llama3 RoPE scaling and tied
embeddings), Mistral (with a sliding window shorter than the sequence), Qwen2 (q/k/v biases) and Qwen3 (q/k norm,
head_dim apart from d_model), built locally with random weights (no network).

The weights are scaled so attention is peaked: near-uniform attention (tiny random init) would hide RoPE and
head-grouping errors, since any permutation of positions or heads averages out. Every model has a vocabulary
that is not a multiple of 128, so the padding clt adds on import and cuts on export is exercised."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SMOKE, smoke_overrides

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clt import cli, config, train  # noqa: E402
from clt.config import ConfigError, MeshConfig, ModelConfig  # noqa: E402
from clt.hf import convert  # noqa: E402
from clt.hf.arch import HFError  # noqa: E402
from clt.hf.safetensors import TensorSet, write_file  # noqa: E402
from clt.sharding import make_mesh, use_mesh  # noqa: E402

VOCAB, T = 300, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=None,
              eos_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # T > 16: every band of the scaling is used
MODELS = {
    "llama": ("LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3_tied": ("LlamaForCausalLM", dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)),
    "mistral": ("MistralForCausalLM", dict(sliding_window=8)),  # 8 < T: the window cuts attention
    "qwen2": ("Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32)),  # 4 heads x 32 != d_model 64
}


def build_hf(name: str, folder: pathlib.Path):
    """A random tiny HF model saved to `folder`, its weights scaled for peaked attention; returns the model."""
    arch, extra = MODELS[name]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = "eager"  # the attention weights are inspected
    torch.manual_seed(sorted(MODELS).index(name))
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20.0)  # peaked attention
            elif pname.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(3.0 + 0.3 * torch.randn_like(p))  # Qwen3 normalises q and k: peaked by their scales
            elif pname.endswith("bias") or "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in pname else 0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, build_hf(name, root / name)) for name in MODELS}


def tokens(seed: int = 0, shape=(2, T)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def clt_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(ids)))


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_imported_logits_equal_transformers(hf_models, name):
    folder, hf = hf_models[name]
    ids = tokens()
    with torch.no_grad():
        attn = hf(torch.tensor(ids), output_attentions=True).attentions
    # the premise: attention is peaked (uniform attention over 32 keys would put ~1/16 on the top one on average)
    assert float(torch.stack(attn)[..., 8:, :].max(-1).values.mean()) > 0.5
    got = clt_logits(convert.import_model(folder), ids)
    want = hf_logits(hf, ids)
    assert got.shape == (2, T, VOCAB)  # the padding (300 -> 384 rows) is not in the logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_import_through_an_fsdp_by_tensor_mesh_holds_only_shards(hf_models):
    folder, hf = hf_models["qwen2"]
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = convert.import_model(folder, mesh=mesh)
    q = model.layers[0].attn.q_proj[...]  # (d, heads, head_dim): fsdp splits d, tensor the heads
    assert q.shape == (64, 4, 16) and {s.data.shape for s in q.addressable_shards} == {(16, 2, 16)}
    embed = model.embed[...]  # (384 padded rows, d): tensor splits the rows
    assert {s.data.shape for s in embed.addressable_shards} == {(192, 16)}
    with use_mesh(mesh):
        got = clt_logits(model, tokens(1, (8, T)))
    np.testing.assert_allclose(got, hf_logits(hf, tokens(1, (8, T))), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama3_tied", "qwen3", "mistral"])
def test_export_loads_in_transformers_with_the_same_logits(hf_models, tmp_path, name):
    folder, hf = hf_models[name]
    model = convert.import_model(folder)
    summary = convert.export_model(model, ModelConfig(max_position_embeddings=128), tmp_path / "out")
    assert summary["architecture"] == MODELS[name][0]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(again, tokens(2)), hf_logits(hf, tokens(2)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_import_export_import_is_lossless(hf_models, tmp_path, name):
    folder, _ = hf_models[name]
    convert.export_model(convert.import_model(folder), ModelConfig(), tmp_path / "out")
    original, exported = TensorSet(folder), TensorSet(tmp_path / "out")
    assert original.names == exported.names
    for n in original.names:
        np.testing.assert_array_equal(np.asarray(exported.array(n)), np.asarray(original.array(n)), err_msg=n)


def test_export_shards_at_the_size_limit_with_an_index(hf_models, tmp_path):
    folder, hf = hf_models["llama"]
    convert.export_model(convert.import_model(folder), ModelConfig(), tmp_path / "out", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(again, tokens(3)), hf_logits(hf, tokens(3)), atol=1e-5, rtol=0)


def test_export_in_bfloat16_halves_the_files(hf_models, tmp_path):
    folder, _ = hf_models["llama"]
    model = convert.import_model(folder)
    convert.export_model(model, ModelConfig(), tmp_path / "f32")
    convert.export_model(model, ModelConfig(), tmp_path / "bf16", dtype="bfloat16")
    f32, bf16 = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "bf16"))
    assert bf16 < 0.55 * f32
    assert TensorSet(tmp_path / "bf16").dtype("model.norm.weight") == jnp.bfloat16
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16


def test_export_never_overwrites(hf_models, tmp_path):
    folder, _ = hf_models["llama"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(HFError, match=r"exists and is not empty"):
        convert.export_model(convert.import_model(folder), ModelConfig(), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, never a silent random init.
# ----------------------------------------------------------------------------------------------------------
def edited(hf_models, tmp_path, name="llama", **changes) -> pathlib.Path:
    """A copy of model `name` whose config.json has `changes` (None deletes the key)."""
    folder = tmp_path / f"{name}-edited"
    shutil.copytree(hf_models[name][0], folder)
    config = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def with_tensors(hf_models, tmp_path, drop=(), add=None) -> pathlib.Path:
    folder = tmp_path / "llama-tensors"
    shutil.copytree(hf_models["llama"][0], folder)
    weights = TensorSet(folder)
    kept = {n: np.asarray(weights.array(n)) for n in weights.names if n not in drop}
    kept.update(add or {})
    write_file(folder / "model.safetensors", kept)
    return folder


@pytest.mark.parametrize("changes, pattern", [
    (dict(architectures=["GPT2LMHeadModel"]), r"architecture 'GPT2LMHeadModel' is not supported; clt imports "
                                              r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"rope_scaling type 'yarn' is not supported; clt implements \['default', 'llama3'\]"),
    (dict(intermediate_size=128), r"tensor model.layers.0.mlp.(down|gate|up)_proj.weight has shape \[\d+, \d+\] but "
                                  r"config.json implies \[\d+, \d+\]"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), r"attention_bias=true .* is not supported"),
])
def test_bad_config_is_a_one_line_error(hf_models, tmp_path, changes, pattern):
    with pytest.raises(HFError, match=pattern) as e:
        convert.import_model(edited(hf_models, tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_missing_and_extra_tensors_are_listed(hf_models, tmp_path):
    folder = with_tensors(hf_models, tmp_path, drop=("model.layers.1.mlp.up_proj.weight", "model.norm.weight"),
                          add={"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(HFError, match=r"the tensors do not match config.json \(missing model.layers.1.mlp.up_proj.weight, "
                                      r"model.norm.weight; unexpected model.layers.0.self_attn.q_proj.bias\)"):
        convert.import_model(folder)


def test_a_folder_without_weights_or_config(tmp_path, hf_models):
    with pytest.raises(HFError, match=r"config.json: missing"):
        convert.import_model(tmp_path)
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(hf_models["llama"][0] / "config.json", folder)
    with pytest.raises(Exception, match=r"safetensors"):
        convert.import_model(folder)


# ----------------------------------------------------------------------------------------------------------
# Continual pre-training from a Hugging Face folder, and the command line.
# ----------------------------------------------------------------------------------------------------------
TEXTS = ["The river carried the boat past the mill, and the miller waved from the bank. " * 6,
         "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 8,
         "Une phrase en français, avec des accents: été, château, garçon. " * 6,
         "Numbers and dates: 1999-12-31, 2026-11-23, 3.14159, 42. " * 8] * 3


@pytest.fixture(scope="module")
def hf_with_data(hf_models, tmp_path_factory):
    """A Qwen2 folder with a tokenizer (byte-level ids, EOS 256 < its 300 ids) and two domains prepared with it."""
    from clt.data.prepare import prepare_text
    from clt.data.tokenizer import write_hf_tokenizer

    root = tmp_path_factory.mktemp("hf_train")
    folder = root / "qwen2"
    shutil.copytree(hf_models["qwen2"][0], folder)
    write_hf_tokenizer("byte", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=256)))
    for i, domain in enumerate(("prose", "code")):
        files = []
        for j, text in enumerate(TEXTS[i::2]):
            files.append(root / f"{domain}{j}.txt")
            files[-1].write_text(text)
        prepare_text([str(f) for f in files], domain=domain, tokenizer=str(folder), out=str(root / domain),
                     eval_fraction=0.3, progress=False)
    return folder, root


def hf_loss(model, rows: np.ndarray) -> float:
    rows = rows.astype(np.int64)
    with torch.no_grad():
        logits = model(torch.tensor(rows[:, :-1])).logits
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       torch.tensor(rows[:, 1:]).reshape(-1)))


def test_train_continues_from_the_hf_weights(hf_models, hf_with_data, tmp_path):
    from clt.data.pipeline import load_domains
    from clt.evaluate import load_eval_sets
    from clt.metrics import read_jsonl

    folder, root = hf_with_data
    domains = {"prose": str(root / "prose"), "code": str(root / "code")}
    cfg = config.load(str(SMOKE), [f"data.domains={domains!r}", f"model.init_from=hf:{folder}"])
    train.train(cfg, str(tmp_path / "run"), progress=False)
    first = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/prose/loss" in r)
    assert first["step"] == 0
    sets = load_eval_sets(load_domains(cfg), ("prose", "code"), cfg.data.seq_len, cfg.data.eval_sequences,
                          cfg.data.eval_batch)
    for d in ("prose", "code"):
        rows = sets[d].tokens[sets[d].weights > 0]
        assert first[f"eval/{d}/loss"] == pytest.approx(hf_loss(hf_models["qwen2"][1], rows), rel=1e-5)
    last = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/prose/loss" in r][-1]
    assert last["eval/prose/loss"] < first["eval/prose/loss"]  # it trained on from there
    # the run records the source's architecture and its tokenizer, and exports back to transformers
    meta = json.loads((tmp_path / "run" / "plan.json").read_text())["config"]["model"]
    assert (meta["qkv_bias"], meta["vocab_size"], meta["init_from"]) == (True, VOCAB, f"hf:{folder}")
    summary = convert.export_checkpoint(str(tmp_path / "run"), tmp_path / "out")
    assert summary["tokenizer_files"] and (tmp_path / "out" / "tokenizer.json").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("héllo")["input_ids"][-5:] == list("héllo".encode())[-5:]
    assert hf_loss(exported, rows) == pytest.approx(last["eval/code/loss"], rel=1e-4)


def test_data_of_another_tokenizer_is_refused(hf_with_data, tmp_path, demo_data):

    folder, _ = hf_with_data  # demo_data is byte-tokenized: same ids, but not the model's tokenizer files
    cfg = config.load(str(SMOKE), smoke_overrides(demo_data, f"model.init_from=hf:{folder}"))
    with pytest.raises(ConfigError, match=r"^data.domains.prose = '.*prose': the data was prepared with tokenizer byte "
                                          r"\(byte\), the model hf:.* uses .*qwen2 \(\w+\); prepare the data with "
                                          r"--tokenizer .*qwen2"):
        train.train(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_config_that_contradicts_the_source_is_refused(hf_with_data, tmp_path):

    folder, root = hf_with_data
    domains = {"prose": str(root / "prose"), "code": str(root / "code")}
    cfg = config.load(str(SMOKE), [f"data.domains={domains!r}", f"model.init_from=hf:{folder}", "model.d_model=128"])
    with pytest.raises(ConfigError, match=r"^model.d_model = 128: init_from hf:.* has d_model=64; remove "
                                          r"model.d_model: the model's shape comes from init_from"):
        train.train(cfg, str(tmp_path / "run"), progress=False)


def test_hf_import_and_export_commands(hf_with_data, tmp_path, capsys):

    folder, _ = hf_with_data
    assert cli.main(["hf", "import", str(folder), str(tmp_path / "wd"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert 'imported Qwen2ForCausalLM (' in out and f'init_from="ckpt:{tmp_path / "wd"}"' in out
    assert cli.main(["hf", "export", str(tmp_path / "wd"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    original, exported = TensorSet(folder), TensorSet(tmp_path / "out")
    for n in original.names:
        np.testing.assert_array_equal(np.asarray(exported.array(n)), np.asarray(original.array(n)), err_msg=n)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    # bad input is one line and exit 2
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "config.json").write_text(json.dumps(dict(json.loads((folder / "config.json").read_text()),
                                                     architectures=["FalconForCausalLM"])))
    assert cli.main(["hf", "import", str(bad), str(tmp_path / "wd2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "architecture 'FalconForCausalLM' is not supported" in err
    assert not (tmp_path / "wd2").exists()
    assert cli.main(["train", str(SMOKE), f"model.init_from=hf:{bad}", "--workdir", str(tmp_path / "w")]) == 2
    assert "architecture 'FalconForCausalLM' is not supported" in capsys.readouterr().err


def ROOT_SMOKE():
    return SMOKE


def test_an_imported_workdir_starts_a_run_with_its_architecture_and_tokenizer(hf_models, hf_with_data, tmp_path):
    """`clt hf import` once, then init_from="ckpt:WORKDIR": the run takes the model's shape from the checkpoint's
    record (the config names no dims), checks the data's tokenizer against the recorded one, and starts from the
    imported weights."""
    from clt.data.pipeline import load_domains
    from clt.evaluate import load_eval_sets
    from clt.metrics import read_jsonl

    folder, root = hf_with_data
    convert.import_to_workdir(folder, tmp_path / "imported")
    domains = {"prose": str(root / "prose"), "code": str(root / "code")}
    cfg = config.load(str(SMOKE), [f"data.domains={domains!r}", f"model.init_from=ckpt:{tmp_path / 'imported'}",
                                   "phases.0.steps=4", "phases.1.steps=4", "phases.2.steps=2"])
    train.train(cfg, str(tmp_path / "run"), progress=False)
    first = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/prose/loss" in r)
    rows = load_eval_sets(load_domains(cfg), ("prose",), cfg.data.seq_len, cfg.data.eval_sequences,
                          cfg.data.eval_batch)["prose"]
    assert first["step"] == 0
    assert first["eval/prose/loss"] == pytest.approx(hf_loss(hf_models["qwen2"][1], rows.tokens[rows.weights > 0]),
                                                     rel=1e-5)
    # the same text prepared with the byte tokenizer (the same ids, but not the model's tokenizer) is refused
    from clt.data.prepare import prepare_text
    byte_domains = {}
    for d in ("prose", "code"):
        byte_domains[d] = str(tmp_path / "byte" / d)
        prepare_text(sorted(str(p) for p in root.glob(f"{d}*.txt")), domain=d, tokenizer="byte", out=byte_domains[d],
                     eval_fraction=0.3, progress=False)
    other = config.load(str(SMOKE), [f"data.domains={byte_domains!r}", f"model.init_from=ckpt:{tmp_path / 'imported'}"])
    with pytest.raises(ConfigError, match=r"the data was prepared with tokenizer byte \(byte\), the model ckpt:.* "
                                          r"uses .*qwen2 \(\w+\)"):
        train.train(other, str(tmp_path / "run2"), progress=False)


def test_a_byte_tokenized_run_exports_with_an_equivalent_tokenizer(smoke_run, tmp_path):
    """The smoke run (preset tiny, byte tokenizer, vocabulary 257 padded to 384 by the data): its export loads in
    transformers with logits equal to clt's on the run's own checkpoint, and its tokenizer gives the byte ids."""
    from clt.checkpoint import load_init_weights
    from clt.config import CheckpointConfig
    from clt.model import Transformer
    from clt.sharding import shardings_of
    from clt.step import resolve_dims

    cfg, wd, _ = smoke_run
    summary = convert.export_checkpoint(str(wd), tmp_path / "out")
    assert summary["tokenizer"] == "byte" and summary["architecture"] == "LlamaForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("é中")["input_ids"] == list("é中".encode())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    dims = resolve_dims(cfg.model, 384)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(dims, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    params = load_init_weights(f"ckpt:{wd}", dims, abstract, shardings_of(mesh, abstract), CheckpointConfig())
    ids = np.random.default_rng(4).integers(0, 257, (2, 16))
    np.testing.assert_allclose(hf_logits(hf, ids), clt_logits(nnx.merge(graphdef, params), ids), atol=1e-4, rtol=0)
