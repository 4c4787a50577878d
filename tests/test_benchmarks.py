"""The overhead and peers benchmarks' pure parts: options, the rows they read, the shapes they hand to peers.

Their smallest runs take about a minute on 2 CPU cores (a `clt train` and a bare loop, or three train steps), too
long for the suite; what can go wrong without a timing is tested here in well under a second each (the
transformers mapping builds a tiny model on the CPU)."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import their shared helpers as `from step import`

import loop_time  # noqa: E402
import overhead  # noqa: E402
import peers  # noqa: E402
import step  # noqa: E402


@pytest.mark.parametrize("module, argv, message", [
    (overhead, ["--batch", "0"], "must be >= 1"),
    (overhead, ["--quick", "--steps", "10"], "at least 3 x --every"),
    (overhead, ["--quick", "--steps", "32"], "multiple of --every"),
    (overhead, ["--rounds", "3"], "1 or 2"),
    (overhead, ["--preset", "nope"], "invalid choice"),
    (peers, ["--steps", "0"], "must be >= 1"),
    (peers, ["--seq-len", "127"], "must be even"),
    (peers, ["--maxtext-remat", "none"], "invalid choice"),
    (step, ["--quick", "--preset", "tiny"], "--quick is its own grid"),
    (step, ["--steps", "0"], "--steps must be >= 1"),
    (step, ["--mesh", "data=2,pipeline=2"], "bad axis 'pipeline=2'"),
    (step, ["--attention", "flash"], "invalid choice"),
    (loop_time, ["--quick", "--config", "configs/demo.py"], "drop --config or --quick"),
])
def test_bad_options_are_one_line_and_exit_2(module, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_step_crosses_presets_with_seq_lens_and_quick_is_small():
    _, _, cases = step.parse_args(["--preset", "tiny", "demo", "--seq-len", "128", "512"])
    assert cases == (("tiny", 128), ("tiny", 512), ("demo", 128), ("demo", 512))
    args, _, cases = step.parse_args(["--quick"])
    assert cases == step.QUICK and (args.steps, args.warmup, args.batch) == (5, 2, 8)
    assert ("1b", 2048) in step.parse_args([])[2] and ("8b", 2048) in step.FULL


def test_quick_fills_only_the_sizes_not_given():
    a = overhead.parse_args(["--quick", "--batch", "4"])
    assert (a.preset, a.batch, a.seq_len, a.steps, a.every, a.rounds) == ("demo", 4, 128, 30, 5, 2)
    a = peers.parse_args(["--quick"])
    assert (a.preset, a.batch, a.seq_len, a.compile) == ("demo", 8, 128, False)
    assert peers.parse_args([]).compile and peers.parse_args([]).preset == "1b"


def test_overhead_order_mirrors_the_second_round():
    assert overhead.order(1) == ["bare", "clt"]
    assert overhead.order(2) == ["bare", "clt", "clt", "bare"]


def test_clt_step_seconds_prefer_step_s_and_drop_the_first_row():
    rows = [dict(step=4, lr=1e-3, loss=3.0, tokens_per_s=100.0),  # the interval after the compile: dropped
            dict(step=9, lr=1e-3, loss=2.0, tokens_per_s=1000.0),
            dict(step=10, phase="p", **{"eval/text/loss": 2.0}),  # an eval row: not a train row
            dict(step=14, lr=1e-3, loss=1.5, tokens_per_s=999.0, step_s=0.25)]
    got = overhead.step_seconds(rows, tokens_per_step=500)
    assert [(r["step"], r["step_s"], r["source"]) for r in got] == [(9, 0.5, "tokens_per_s"), (14, 0.25, "step_s")]


def test_overhead_clt_config_forces_only_the_start_and_end_evals(tmp_path):
    from clt import monitor, plan

    args = overhead.parse_args(["--quick"])
    cfg = overhead.clt_config(args, tmp_path / "text")
    resolved = plan.resolve(cfg)
    assert monitor.eval_steps(resolved, cfg.monitor) == [0, args.steps]
    assert (cfg.batch_size, cfg.data.seq_len, cfg.log.every, cfg.checkpoint.every) == (8, 128, 5, 0)


def test_interval_times_match_the_loops_accounting():
    rows = overhead.interval_times(lambda at: at, steps=15, every=5)
    assert [(r["step"], r["steps"]) for r in rows] == [(4, 4), (9, 5), (14, 5)]  # step 0 (compile) is not timed


def test_transformers_config_has_clts_dims_and_param_count():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from clt.model import param_count

    dims = peers.model_dims("tiny")
    cfg = peers.llama_config(dims, seq_len=64)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (64, 2, 4, 2, 192, 384, True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    assert sum(p.numel() for p in model.parameters()) == param_count(dims)


def test_maxtext_overrides_carry_the_shape_and_the_optimizer():
    args = peers.parse_args(["--quick", "--batch", "8"])
    dims = peers.model_dims("demo")
    kv = dict(o.split("=", 1) for o in peers.maxtext_overrides(args, dims, "gpu", 2, "/tmp/x"))
    assert (kv["base_emb_dim"], kv["base_num_query_heads"], kv["base_num_kv_heads"], kv["base_mlp_dim"],
            kv["base_num_decoder_layers"], kv["head_dim"], kv["vocab_size"]) == ("192", "6", "2", "512", "4", "32", "384")
    assert (kv["per_device_batch_size"], kv["max_target_length"], kv["steps"]) == ("4", "128", "14")
    assert (kv["dataset_type"], kv["attention"], kv["hardware"], kv["logits_via_embedding"]) == \
        ("synthetic", "cudnn_flash_jax", "gpu", "true")
    with pytest.raises(ValueError, match="does not divide"):
        peers.maxtext_overrides(args, dims, "gpu", 3, "/tmp/x")


def test_maxtext_log_lines_parse():
    log = ("I1203 metric_logger.py:265] completed step: 0, seconds: 0.166, TFLOP/s/device: 0.065, Tokens/s/device: "
           "6169.269, total_weights: 1024, loss: 6.429\nnoise\n"
           "I1203 metric_logger.py:265] completed step: 1, seconds: 0.916, TFLOP/s/device: 0.012, Tokens/s/device: 1\n")
    assert peers.parse_maxtext_log(log) == [(0, 0.166, 0.065), (1, 0.916, 0.012)]


def test_maxtext_missing_is_a_reason_not_an_error():
    import importlib.util

    if importlib.util.find_spec("maxtext") is not None:
        pytest.skip("maxtext is installed here")
    info, why = peers.maxtext_probe(sys.executable)
    assert info is None and "maxtext is not installed" in why and "3.12" in why
    json.dumps(why)  # it goes into the JSON line as is
