"""`clt <verb>`: argument order, --version, `clt schedule NAME`, compact output, and every bad input as one line
`clt: error: <field> = <value>: <problem>; <fix>` with exit 2 (never a traceback)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import smoke_overrides

from clt import cli, config, plan, plan_view
from clt.config import ConfigError
from clt.data.shards import DomainData
from clt.data.tokenizer import TokenizerError, load_tokenizer
from clt.metrics import TensorBoardSink
from clt.schedule import lr_at
from clt.sharding import check_layout, make_mesh, mesh_axis_sizes
from clt.step import resolve_dims

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE, DEMO = str(ROOT / "configs" / "smoke.py"), str(ROOT / "configs" / "demo.py")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def user_error(capsys, pattern: str, *argv: str) -> str:
    """Exit 2 with exactly one `clt: error:` line, matching `pattern`, and no traceback."""
    rc, out, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("clt: error:")]
    assert rc == 2 and len(errors) == 1, (rc, out, err)
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in err
    return errors[0]


def text_files(folder: pathlib.Path, n: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"Document number {i}. " * 20)
        paths.append(str(folder / f"doc{i}.txt"))
    return paths


# ----------------------------------------------------------------------------------------------------------
# Argument order: options and positionals mix freely for every verb.
# ----------------------------------------------------------------------------------------------------------
def test_prepare_takes_options_before_the_files(tmp_path, capsys):
    files = text_files(tmp_path / "docs")
    out = tmp_path / "legal"
    rc, stdout, _ = run(capsys, "prepare", "text", "--domain", "legal", "--tokenizer", "byte", "--out", str(out),
                        "--quiet", *files)
    assert rc == 0 and DomainData(out).train.num_docs + DomainData(out).eval.num_docs == 3
    # Files first, options last is the same command.
    args = cli.parse_args(["prepare", "text", *files, "--out", str(out), "--domain", "legal"])
    assert args.files == files and args.domain == "legal" and args.out == str(out)


def test_overrides_may_follow_options_for_every_verb():
    args = cli.parse_args(["schedule", "wsd", "--steps", "100", "peak=1e-3", "--csv"])
    assert (args.name, args.overrides, args.steps, args.csv) == ("wsd", ["peak=1e-3"], 100, True)
    args = cli.parse_args(["plan", "--csv", "show", SMOKE, "--wide", "batch_size=16", "seed=1"])
    assert (args.action, args.config, args.overrides, args.wide) == ("show", SMOKE, ["batch_size=16", "seed=1"], True)
    args = cli.parse_args(["train", "--workdir", "w", SMOKE, "--quiet", "batch_size=4", "--init-from", "ckpt:a"])
    assert (args.config, args.overrides, args.workdir, args.init_from) == (SMOKE, ["batch_size=4"], "w", "ckpt:a")


def test_unknown_options_and_verbs_are_usage_errors(capsys):
    for argv in (["plan", "show", SMOKE, "--bogus"], ["plna", "show"], [], ["report", "a", "b"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()


def test_version_is_one_line_with_the_library_versions():
    proc = subprocess.run([sys.executable, "-m", "clt.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"clt \d+\.\d+\S* \(jax \d\S*, flax \d\S*, orbax-checkpoint \d\S*\)\n", proc.stdout)


# ----------------------------------------------------------------------------------------------------------
# clt schedule NAME: a preset when there is one (as in a config), else the kind; kind=KIND is the bare kind.
# ----------------------------------------------------------------------------------------------------------
def schedule_lr(capsys, *argv: str) -> np.ndarray:
    rc, out, err = run(capsys, "schedule", *argv)
    assert rc == 0, err
    return np.array([float(line.split(",")[1]) for line in out.splitlines()[1:]])


def preset_lr(name: str, steps: int) -> np.ndarray:
    raw = dict(data=dict(domains={"all": "-"}, seq_len=1024), batch_size=32,
               phases=(dict(name="p", steps=steps, mixture={"all": 1.0}, schedule=name),))
    return np.asarray(lr_at(plan.resolve(config.from_dict(raw)), np.arange(steps)))


def test_a_preset_name_means_the_preset(capsys):
    cosine = schedule_lr(capsys, "cosine", "--steps", "100")
    assert cosine.max() == pytest.approx(3e-4) and cosine[-1] == pytest.approx(3e-5, rel=0.01)  # 10% of the peak
    np.testing.assert_allclose(cosine, preset_lr("cosine", 100), rtol=1e-5)
    # power is a preset too: the bare kind has end=0 and would be an error.
    np.testing.assert_allclose(schedule_lr(capsys, "power", "--steps", "100"), preset_lr("power", 100), rtol=1e-5)


def test_a_kind_that_is_no_preset_and_the_bare_kind(capsys):
    wsd = schedule_lr(capsys, "wsd", "--steps", "100", "peak=1e-3", "end=1e-5")
    assert wsd[0] == pytest.approx(1e-3) and wsd[50] == pytest.approx(1e-3) and wsd[-1] < 1e-4
    bare = schedule_lr(capsys, "kind=cosine", "--steps", "100", "peak=1e-3")
    assert bare[0] == pytest.approx(1e-3) and bare[-1] < 1e-6  # no warmup, decays to end=0
    assert np.array_equal(bare, schedule_lr(capsys, "--steps", "100", "kind=cosine", "peak=1e-3"))


def test_schedule_errors_name_the_users_key(capsys):
    line = user_error(capsys, r"^clt: error: warmup = 200(\.0)?: warmup \(200 steps\) must be shorter",
                      "schedule", "cosine", "--steps", "100", "warmup=200")
    assert "phases" not in line and "segment" not in line
    user_error(capsys, r"^clt: error: --steps = 0: must be positive", "schedule", "cosine", "--steps", "0")
    user_error(capsys, r"^clt: error: end = 1(\.0)?: end LR is above the peak", "schedule", "linear", "--steps",
               "10", "end=1")
    user_error(capsys, r"^clt: error: NAME = 'cosin': neither a preset .* nor a built-in kind; did you mean 'cosine'",
               "schedule", "cosin", "--steps", "10")
    user_error(capsys, r"^clt: error: NAME = None: no schedule given; .*kind=KIND", "schedule", "--steps", "10")


# ----------------------------------------------------------------------------------------------------------
# Compact output.
# ----------------------------------------------------------------------------------------------------------
def test_plan_show_fits_120_columns_and_wide_shows_everything(capsys):
    rc, out, _ = run(capsys, "plan", "show", DEMO)
    assert rc == 0 and max(len(line) for line in out.splitlines()) <= 120
    assert "cosine 3e-3->3e-4 w30" in out and "@750 code:.70 prose:.30" in out
    rc, wide, _ = run(capsys, "plan", "show", DEMO, "--wide")
    assert rc == 0 and max(len(line) for line in wide.splitlines()) > 120
    assert "n_steps" in wide and "optimizer" in wide and "cosine peak=0.003 warmup=30 end=0.0003" in wide


def test_narrow_plan_rows_keep_columns_that_say_something():
    raw = config.load_raw(SMOKE)
    raw["phases"][1].update(optimizer="reset", blend_steps=3)
    pl = plan.resolve(config.from_dict(raw))
    rows = plan_view.plan_rows(pl, wide=False)
    assert [r["optimizer"] for r in rows] == ["keep", "reset", "keep"] and rows[1]["blend"] == 3
    assert "n_steps" not in rows[0] and "n_steps" in plan_view.plan_rows(pl)[0]


def test_format_table_cuts_the_widest_column_to_fit():
    rows = [dict(a="x", long="y" * 200, b="z"), dict(a="xx", long="short", b="zz")]
    text = plan_view.format_table(rows, max_width=60)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 60 and lines[2].rstrip().endswith("z") and "…" in lines[2]
    assert "short" in lines[3]
    assert plan_view.format_table(rows).count("y") == 200  # no width: nothing cut
    named = [dict(name="n" * 30, long="y" * 200, more="m" * 40)]
    lines = plan_view.format_table(named, max_width=70, cut={"long": 20, "more": 10}).splitlines()
    assert lines[2].startswith("n" * 30 + "  ") and max(map(len, lines)) <= 70
    assert lines[2].count("y") == 22 and lines[2].count("m") == 12  # both keep 3 over their soft widths


def test_prepare_prints_a_small_table(tmp_path, capsys):
    files = text_files(tmp_path / "docs", n=4)
    rc, out, _ = run(capsys, "prepare", "text", "--domain", "legal", "--out", str(tmp_path / "legal"), "--quiet",
                     *files)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 4, out
    assert lines[0] == f"prepared 1 domain (tokenizer byte): {tmp_path / 'legal'}"
    assert lines[1].split() == ["domain", "train", "docs", "train", "tokens", "eval", "docs", "eval", "tokens",
                                "bytes/token"]
    summary = json.loads((tmp_path / "legal" / "prepare.json").read_text())
    cells = lines[3].split()
    assert cells[:3] == ["legal", str(summary["train"]["docs"]), f"{summary['train']['tokens']:,}"]
    assert cells[3:5] == [str(summary["eval"]["docs"]), f"{summary['eval']['tokens']:,}"]
    assert max(map(len, lines[1:])) < 80


def test_read_only_verbs_print_no_library_chatter(tmp_path):
    """Orbax warns through absl that a read-only manager is read-only: `clt replay` and `clt ckpt` hide it."""
    raw = config.load_raw(SMOKE)
    raw["replay_buffer"] = dict(capacity=8)
    cfg = config.from_dict(raw)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "plan.json").write_text(json.dumps(dict(plan=plan.resolve(cfg).to_json(), config=cfg.to_dict())))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    replay = subprocess.run([sys.executable, "-m", "clt.cli", "replay", "info", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    assert replay.returncode == 2 and re.fullmatch(r"clt: error: path = .*: has no checkpoint yet; [^\n]*\n",
                                                   replay.stderr), replay.stderr
    ckpt = subprocess.run([sys.executable, "-m", "clt.cli", "ckpt", "ls", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    assert ckpt.returncode == 0 and ckpt.stderr == "" and "no checkpoints" in ckpt.stdout


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the field, exit 2.
# ----------------------------------------------------------------------------------------------------------
def test_config_path_that_is_a_folder_or_not_python(tmp_path, capsys):
    user_error(capsys, r"^clt: error: config = '.*configs': is a folder, not a config file; give one of the files "
                       r"in it, e.g. .*demo\.py", "plan", "show", str(ROOT / "configs"))
    (tmp_path / "notes.txt").write_text("get_config = 1")
    user_error(capsys, r"^clt: error: config = '.*notes\.txt': is not a Python \(\.py\) file; give the path of a "
                       r"get_config\(\) file", "train", str(tmp_path / "notes.txt"), "--workdir", str(tmp_path / "w"))


def test_workdir_that_is_a_file_or_under_a_file(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("")
    user_error(capsys, r"^clt: error: --workdir = '.*taken': is a file, not a folder; give a folder",
               "train", SMOKE, "--workdir", str(file))
    user_error(capsys, r"^clt: error: --workdir = '.*taken/run': cannot be created: .*taken is a file; ",
               "train", SMOKE, "--workdir", str(file / "run"))


def test_workdir_that_cannot_be_written(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root?) may write to a read-only folder")
        user_error(capsys, r"^clt: error: --workdir = '.*locked': is not writable; fix its permissions",
                   "train", SMOKE, "--workdir", str(locked))
        user_error(capsys, r"^clt: error: --workdir = '.*locked/run': cannot be created: .*locked is not writable",
                   "train", SMOKE, "--workdir", str(locked / "run"))
    finally:
        locked.chmod(0o700)


def test_init_from_without_the_ckpt_prefix(tmp_path, capsys):
    src = tmp_path / "runs" / "a"
    src.mkdir(parents=True)
    user_error(capsys, rf"^clt: error: --init-from = '{re.escape(str(src))}': not a weights source: it needs the ckpt: "
                       rf"prefix .*; write ckpt:{re.escape(str(src))} ", "train", SMOKE, "--workdir",
               str(tmp_path / "b"), "--init-from", str(src))
    user_error(capsys, rf"^clt: error: model.init_from = '{re.escape(str(src))}': not a weights source.*write ckpt:",
               "train", SMOKE, f"model.init_from={src}", "--workdir", str(tmp_path / "b"))
    user_error(capsys, r"^clt: error: --init-from = 'ckpt:.*nowhere@5': no such folder .*nowhere; give the --workdir",
               "train", SMOKE, "--workdir", str(tmp_path / "b"), "--init-from", f"ckpt:{tmp_path / 'nowhere'}@5")
    assert not (tmp_path / "b").exists()  # found before the run started


def test_seq_len_longer_than_an_eval_split(demo_data, tmp_path, capsys):
    evals = {d: DomainData(demo_data / d).eval.num_tokens for d in ("prose", "code")}
    short = min(evals, key=evals.get)
    too_long = evals[short]  # a sequence reads seq_len + 1 tokens
    assert all(DomainData(demo_data / d).train.num_tokens > too_long + 1 for d in evals)  # only eval is short
    user_error(capsys, rf"^clt: error: data.seq_len = {too_long}: longer than the eval split of domain '{short}' "
                       rf"allows: .* at most seq_len {too_long - 1}; set data.seq_len <= {too_long - 1}",
               "train", SMOKE, *smoke_overrides(demo_data, f"data.seq_len={too_long}"), "--workdir",
               str(tmp_path / "w"), "--quiet")


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is not None, reason="tensorboardX is installed")
def test_tensorboard_without_its_package(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^log.tensorboard = True: needs the tensorboardX package.*; "
                                          r"pip install tensorboardX"):
        TensorBoardSink(tmp_path / "tb")
    user_error(capsys, r"^clt: error: log.tensorboard = True: .*pip install tensorboardX", "train", SMOKE,
               "log.tensorboard=True", "--workdir", str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_missing_tokenizer_file_says_the_file_is_missing(tmp_path, capsys):
    # Without the tokenizers package too: the path is the mistake, not the package.
    with pytest.raises(TokenizerError, match=r"nope\.json' does not exist: pass 'byte'"):
        load_tokenizer(str(tmp_path / "nope.json"))
    user_error(capsys, r"^clt: error: --tokenizer = '.*nope\.json': no such file; give byte, the path of a Hugging "
               r"Face tokenizer.json, or a model folder$", "prepare", "text", "--domain", "d", "--tokenizer",
               str(tmp_path / "nope.json"), "--out", str(tmp_path / "out"), *text_files(tmp_path / "docs"))
    (tmp_path / "model").mkdir()  # a model folder without its tokenizer files
    user_error(capsys, r"^clt: error: --tokenizer = '.*model': the folder has no tokenizer.json; give a Hugging Face "
               r"model folder", "prepare", "demo", "--tokenizer", str(tmp_path / "model"), "--out", str(tmp_path / "o"))
    user_error(capsys, r"^clt: error: .*docs is a folder: pass the files in it or a glob", "prepare", "text",
               "--domain", "d", "--out", str(tmp_path / "out"), str(tmp_path / "docs"))
    user_error(capsys, r"^clt: error: --eval-fraction = 1.5: must be in \[0, 1\)", "prepare", "text", "--domain",
               "d", "--out", str(tmp_path / "out"), "--eval-fraction", "1.5", *text_files(tmp_path / "docs"))
    assert not (tmp_path / "out").exists()


def test_empty_domains_say_none_are_declared(capsys):
    line = user_error(capsys, r"^clt: error: data.domains = \{\}: no domains declared; add data.domains=",
                      "plan", "show", SMOKE, "data.domains={}")
    assert not line.endswith(": ")


# ----------------------------------------------------------------------------------------------------------
# clt plan show: everything that needs no data; --devices N for the mesh and batches of another machine.
# ----------------------------------------------------------------------------------------------------------
def test_plan_show_checks_the_model_and_the_mesh(capsys):
    user_error(capsys, r"^clt: error: model.preset = 'huge': unknown preset", "plan", "show", SMOKE,
               "model.preset=huge")
    # tiny: 4 heads, 2 kv heads, d_ff 192. Without a device count the tensor axis is still checked.
    user_error(capsys, r"^clt: error: mesh.tensor = 3: does not divide model.n_heads = 4 .*: 1, 2; or change",
               "plan", "show", SMOKE, "mesh.tensor=3")
    user_error(capsys, r"^clt: error: mesh.tensor = 3: mesh fsdp=1 x tensor=3 = 3 does not divide 8 devices "
                       r"\(data=-1 takes the rest\); use a mesh.tensor that divides 8: 1, 2, 4, 8",
               "plan", "show", "--devices", "8", SMOKE, "mesh.tensor=3", "model.preset=125m", "model.d_ff=3072")
    # 12 heads and d_ff 3072 split 3 ways: only a device count can make tensor=3 wrong.
    assert run(capsys, "plan", "show", SMOKE, "mesh.tensor=3", "model.preset=125m", "model.d_ff=3072")[0] == 0
    user_error(capsys, r"^clt: error: --devices = 0: ", "plan", "show", SMOKE, "--devices", "0")


def test_plan_show_devices_checks_batch_sizes(capsys):
    assert run(capsys, "plan", "show", SMOKE, "batch_size=12")[0] == 0  # 12 rows fit an unknown machine
    user_error(capsys, r"^clt: error: batch_size = 12: does not split over data x fsdp = 8 x 1 = 8 devices; use a "
                       r"multiple of 8, e.g. 16", "plan", "show", SMOKE, "batch_size=12", "--devices", "8")
    assert run(capsys, "plan", "show", SMOKE, "batch_size=12", "--devices", "4")[0] == 0
    user_error(capsys, r"^clt: error: phases.shift.batch_size = 4: does not split over data x fsdp = 8 x 1",
               "plan", "show", SMOKE, "phases.shift.batch_size=4", "--devices", "8")
    user_error(capsys, r"^clt: error: data.eval_batch = 4: does not split over data x fsdp = 2 x 4 = 8 devices",
               "plan", "show", SMOKE, "data.eval_batch=4", "mesh.fsdp=4", "--devices", "8")
    user_error(capsys, r"^clt: error: optim.grad_accum = 2: micro-batches of batch_size / grad_accum = 4 rows do not "
                       r"split over data x fsdp = 8 devices; use a grad_accum of 1$",
               "plan", "show", SMOKE, "optim.grad_accum=2", "--devices", "8")


def layout(cfg, pl, n_devices, vocab_size=None):
    """check_layout as its callers use it: the run's vocabulary when known (clt train), else a placeholder
    that leaves it unchecked unless model.vocab_size gives it (clt plan show)."""
    dims = resolve_dims(cfg.model, vocab_size or 128)
    check_layout(cfg, pl, n_devices, dims, vocab_known=bool(vocab_size or cfg.model.vocab_size))


def test_check_layout_unit(capsys):
    cfg = config.load(SMOKE, ["mesh.tensor=2"])
    pl = plan.resolve(cfg)
    layout(cfg, pl, 8, vocab_size=384)
    layout(cfg, pl, None)  # the data's vocabulary unknown: not checked
    layout(cfg, pl, 8, vocab_size=257)  # padded to 384 embedding rows
    three = config.load(SMOKE, ["mesh.tensor=3", "mesh.data=1", "model.n_heads=3", "model.n_kv_heads=3",
                                "model.d_model=48", "model.d_ff=96"])
    with pytest.raises(ConfigError, match=r"^mesh.tensor = 3: does not divide the embedding's 128 rows \(the "
                                          r"vocabulary padded to a multiple of 128\); use a divisor of 128"):
        layout(three, plan.resolve(three), 3, vocab_size=100)
    fsdp = config.load(SMOKE, ["mesh.fsdp=3", "mesh.data=1", "model.d_model=64"])
    with pytest.raises(ConfigError, match=r"^mesh.fsdp = 3: does not divide model.d_model = 64"):
        layout(fsdp, pl, None)
    accum = config.load(SMOKE, ["optim.grad_accum=3"])
    with pytest.raises(ConfigError, match=r"^optim.grad_accum = 3: does not divide batch_size = 8"):
        layout(accum, plan.resolve(config.load(SMOKE)), None)


def test_make_mesh_and_check_layout_share_one_mesh_check():
    cfg = config.load(SMOKE, ["mesh.fsdp=2", "mesh.tensor=2"])
    assert mesh_axis_sizes(cfg.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(cfg.mesh).shape) == mesh_axis_sizes(cfg.mesh, 8)
    bad = config.load(SMOKE, ["mesh.fsdp=3"])
    with pytest.raises(ConfigError) as from_mesh:
        make_mesh(bad.mesh)
    with pytest.raises(ConfigError) as from_layout:
        layout(bad, plan.resolve(bad), 8)
    assert str(from_mesh.value) == str(from_layout.value)
