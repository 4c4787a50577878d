"""`clt sweep`: grid and zipped expansion and run names, every point checked before anything runs (one line per
bad point), the report's numbers from hand-written run files, and a real 2 x 2 sweep of configs/smoke.py that
is interrupted, resumed and skipped, and reported."""

import csv
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import JAX_CACHE, ROOT, SMOKE, smoke_overrides

from clt import cli, config, plan, resume, sweep

SMOKE_SWEEP = ROOT / "configs" / "sweeps" / "smoke_replay_peak.py"


def sweep_file(tmp_path: pathlib.Path, body: str, name: str = "s.py") -> pathlib.Path:
    """A sweep config whose get_config() returns `body` (a dict expression); `SMOKE` is the smoke config's path."""
    path = tmp_path / name
    path.write_text(f"SMOKE = {str(SMOKE)!r}\n\n\ndef get_config():\n    return "
                    + textwrap.indent(textwrap.dedent(body).strip(), "    ").lstrip() + "\n")
    return path


def user_errors(capsys, *argv: str) -> list[str]:
    """Run `clt ARGV` expecting exit 2; its `clt: error:` lines (and no traceback)."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err, (rc, out, err)
    return [line for line in err.splitlines() if line.startswith("clt: error:")]


# ----------------------------------------------------------------------------------------------------------
# The grid: expansion, zipped groups, names.
# ----------------------------------------------------------------------------------------------------------
def test_grid_is_the_product_of_the_axes_then_seeds_with_readable_names(tmp_path):
    path = sweep_file(tmp_path, """
        dict(base=SMOKE, seeds=(0, 1),
             axes=(dict(key="phases.shift.replay", values=(0.0, 0.25)),
                   dict(key="phases.shift.schedule.peak", values=(1e-3, 3e-4), label="peak")))""")
    points = sweep.expand(sweep.load_sweep(str(path)))
    assert [p.name for p in points] == [
        "replay=0,peak=1e-3,seed=0", "replay=0,peak=1e-3,seed=1", "replay=0,peak=3e-4,seed=0",
        "replay=0,peak=3e-4,seed=1", "replay=0.25,peak=1e-3,seed=0", "replay=0.25,peak=1e-3,seed=1",
        "replay=0.25,peak=3e-4,seed=0", "replay=0.25,peak=3e-4,seed=1"]
    assert points[5].point == "replay=0.25,peak=1e-3" and points[5].seed == 1
    assert points[5].overrides == ("phases.shift.replay=0.25", "phases.shift.schedule.peak=0.001", "seed=1")


def test_a_zipped_group_moves_together(tmp_path):
    path = sweep_file(tmp_path, """
        dict(base=SMOKE,
             axes=(dict(zip=(dict(key="phases.shift.schedule.peak", values=(1e-3, 3e-3), label="peak"),
                             dict(key="phases.shift.schedule.warmup", values=(2, 4)))),
                   dict(key="phases.shift.replay", values=(0.0, 0.25), label="replay")))""")
    spec = sweep.load_sweep(str(path))
    assert spec.labels == ["peak", "warmup", "replay"] and len(spec.groups) == 2
    assert [p.name for p in sweep.expand(spec)] == [
        "peak=1e-3,warmup=2,replay=0", "peak=1e-3,warmup=2,replay=0.25",
        "peak=3e-3,warmup=4,replay=0", "peak=3e-3,warmup=4,replay=0.25"]


def test_value_text_is_short_and_names_of_values_without_one_are_given():
    got = [sweep.value_text(v) for v in (0.25, 1e-3, 3e-4, 0.1, 0.05, 1e-5, 1000.0, 0.0, 12, True, "rewarm_cosine",
                                          "a/b c", {"kind": "wsd"}, (1, 2))]
    assert got == ["0.25", "1e-3", "3e-4", "0.1", "0.05", "1e-5", "1e3", "0", "12", "True", "rewarm_cosine", "a_b_c",
                   None, None]


def test_a_runs_name_depends_only_on_its_axis_values(tmp_path):
    """Other fields of the sweep (its overrides, metrics, name) and command-line overrides leave run names as they
    were, so a rerun finds the same folders; its overrides go through the loader as the same values."""
    axes = 'axes=(dict(key="phases.shift.schedule", values=("rewarm_cosine", dict(kind="constant", peak=1e-3)), ' \
           'names=("cos", "const")),)'
    a = sweep.load_sweep(str(sweep_file(tmp_path, f"dict(base=SMOKE, {axes})", "a.py")))
    b = sweep.load_sweep(str(sweep_file(tmp_path, f'dict(base=SMOKE, name="other", overrides=("log.every=4",), '
                                                  f'metrics=("final/*",), {axes})', "b.py")), ["batch_size=16"])
    assert [p.name for p in sweep.expand(a)] == [p.name for p in sweep.expand(b)] == ["schedule=cos", "schedule=const"]
    const = sweep.expand(b)[1]
    assert sweep.run_overrides(b, const) == ["log.wandb.group='other'", "log.wandb.tags=('schedule=const',)",
                                             "log.every=4", "batch_size=16",
                                             "phases.shift.schedule={'kind': 'constant', 'peak': 0.001}"]
    cfg = sweep.run_config(b, const)
    assert (cfg.phases[1].schedule.kind, cfg.phases[1].schedule.peak, cfg.batch_size) == ("constant", 1e-3, 16)


def test_seeds_and_axis_values_reach_the_validated_config(demo_data, tmp_path):
    spec = sweep.load_sweep(str(SMOKE_SWEEP), smoke_overrides(demo_data))
    spec = dataclasses.replace(spec, seeds=(3, 4))
    points = sweep.expand(spec)
    built = sweep.validate(spec, points)
    cfg, pl = built["replay=0.25,peak=3e-3,seed=4"]
    assert (cfg.seed, pl.seed, cfg.phases[1].replay.share, cfg.phases[1].schedule.peak) == (4, 4, 0.25, 3e-3)
    assert pl.phases[1].replay_share == 0.25 and len(built) == 8
    # W&B: the group is the sweep's name, the tags the point's axis values and seed (used when a project is set)
    assert (cfg.log.wandb.group, cfg.log.wandb.tags) == (spec.name, ("replay=0.25", "peak=3e-3", "seed=4"))


def test_size_multiplies_the_scaled_keys_and_leaves_the_ones_set_elsewhere(tmp_path):
    """size=N replaces the file's own override of a scaled key (no key is given twice), scales the base config's
    value of the others, and leaves a key the command line or an axis sets at that value; without size=N the
    overrides are the file's, unchanged."""
    body = """
        dict(base=SMOKE, overrides=("monitor.every=3", "batch_size=8"),
             scaled=("monitor.dense_every", "monitor.every", "monitor.dense_window", "log.every"),
             axes=(dict(key="monitor.dense_window", values=(4, 6)),))"""
    path = str(sweep_file(tmp_path, body))
    base = config.load(str(SMOKE))
    plain = sweep.load_sweep(path, ["log.every=5"])
    assert plain.overrides == ("monitor.every=3", "batch_size=8", "log.every=5")
    big = sweep.load_sweep(path, ["size=3", "log.every=5"])
    assert big.overrides == ("batch_size=8", f"monitor.dense_every={3 * base.monitor.dense_every}", "monitor.every=9",
                             "log.every=5")
    built = sweep.validate(big, sweep.expand(big))
    cfg, _ = built["dense_window=6"]
    assert (cfg.monitor.dense_every, cfg.monitor.every, cfg.log.every, cfg.monitor.dense_window, cfg.batch_size) == (
        3 * base.monitor.dense_every, 9, 5, 6, 8)


def test_a_bad_size_is_one_line(tmp_path, capsys):
    scaled = sweep_file(tmp_path, """
        dict(base=SMOKE, scaled=("log.every",), axes=(dict(key="batch_size", values=(8,)),))""", "a.py")
    for size in ("0", "two", "1.5"):
        assert user_errors(capsys, "sweep", str(scaled), f"size={size}", "--workdir", "w", "--dry-run") == [
            f"clt: error: size = '{size}': is a positive whole number (the sweep's scaled keys are multiplied by "
            "it); write e.g. size=4"]
    assert user_errors(capsys, "sweep", str(SMOKE_SWEEP), "size=2", "--workdir", "w", "--dry-run") == [
        "clt: error: size = '2': this sweep declares no scaled keys; add c.scaled = ('budget.steps', "
        "'monitor.every', ...) to the sweep file, or override the keys themselves"]
    for key, problem in (("optim.clip", "is 1.0 in the base config, not a whole number"),
                         ("budget.steps", "is None in the base config, not a whole number"),  # its phases give steps
                         ("monitor.evry", "names no field of the base config")):
        path = sweep_file(tmp_path, f"""
            dict(base=SMOKE, scaled=("log.every", {key!r}), axes=(dict(key="batch_size", values=(8,)),))""")
        assert user_errors(capsys, "sweep", str(path), "size=2", "--workdir", "w", "--dry-run") == [
            f"clt: error: scaled = {key!r}: {problem}; list only keys counted in steps, e.g. budget.steps, "
            "monitor.every, log.every"]
    assert not pathlib.Path("w").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line per offending point (naming it and the field), exit 2, nothing created.
# ----------------------------------------------------------------------------------------------------------
def test_an_axis_naming_no_field_is_reported_for_every_point(tmp_path, capsys):
    path = sweep_file(tmp_path, """
        dict(base=SMOKE, seeds=(0, 1), axes=(dict(key="phases.shift.replayy", values=(0.0, 0.25), label="r"),))""")
    lines = user_errors(capsys, "sweep", str(path), "--workdir", str(tmp_path / "w"))
    assert len(lines) == 4 and not (tmp_path / "w").exists()
    for line, name in zip(lines, ("r=0,seed=0", "r=0,seed=1", "r=0.25,seed=0", "r=0.25,seed=1")):
        assert line.startswith(f"clt: error: sweep point {name}: phases.1.replayy = ") and \
            "unknown field; did you mean 'replay'?" in line, line


def test_a_value_that_fails_validation_names_only_its_points(tmp_path, capsys):
    path = sweep_file(tmp_path, """
        dict(base=SMOKE, axes=(dict(key="phases.shift.replay", values=(0.25, 1.5, 2.0), label="replay"),
                               dict(key="batch_size", values=(8, 16))))""")
    lines = user_errors(capsys, "sweep", str(path), "--workdir", str(tmp_path / "w"), "--dry-run")
    assert [re.match(r"clt: error: sweep point (\S+): phases\.shift\.replay\.share = ([\d.]+): replay share must "
                     r"be in \[0, 1\)", line).groups() for line in lines] == [
        ("replay=1.5,batch_size=8", "1.5"), ("replay=1.5,batch_size=16", "1.5"),
        ("replay=2,batch_size=8", "2.0"), ("replay=2,batch_size=16", "2.0")], lines


def test_two_points_with_one_name_are_refused(tmp_path, capsys):
    path = sweep_file(tmp_path, """
        dict(base=SMOKE, axes=(dict(key="phases.shift.mixture", values=(dict(code=1.0), dict(code=2.0)),
                                    label="mix", names=("code", "code")),
                               dict(key="data.seq_len", values=("a/b", "a_b"), label="len")))""")
    lines = user_errors(capsys, "sweep", str(path), "--workdir", str(tmp_path / "w"))
    assert [line.split(":")[2].strip() for line in lines] == ["sweep point mix=code,len=a_b"]
    assert "4 grid points have this name" in lines[0] and "phases.shift.mixture={'code': 2.0}" in lines[0]


def test_unknown_metrics_and_a_bad_sweep_file_are_one_line_each(tmp_path, capsys):
    path = sweep_file(tmp_path, """
        dict(base=SMOKE, axes=(dict(key="seed", values=(0, 1)),))""", "seed.py")
    assert user_errors(capsys, "sweep", str(path), "--workdir", "w") == [
        "clt: error: axes.0.key = 'seed': seeds are their own field; write c.seeds = (0, 1, ...)"]
    for body, expected in (
            ('dict(base=SMOKE, axes=(dict(key="batch_size", valuse=(8,)),))',
             "axes.0.valuse = (8,): unknown field; did you mean 'values'?"),
            ('dict(base=SMOKE, axes=(dict(zip=(dict(key="batch_size", values=(8, 16)), '
             'dict(key="seed", values=(1,)))),))',
             "axes.0.zip.1.key = 'seed': seeds are their own field"),
            ('dict(base=SMOKE, axes=(dict(zip=(dict(key="batch_size", values=(8, 16)), '
             'dict(key="log.every", values=(1,)))),))', "axes.0.zip = [2, 1]: zipped axes move together"),
            ('dict(base=SMOKE, axes=(dict(key="batch_size", values=(8,)), dict(key="optim.batch_size", values=(8,))))',
             "axes = ['batch_size']: two axes have the same label"),
            ('dict(base="nowhere.py", axes=(dict(key="batch_size", values=(8,)),))',
             "base = 'nowhere.py': no such file"),
            ('dict(base=SMOKE, axes=(dict(key="batch_size", values=(8, 16)),), '
             'metrics=("final/*", "gapp/*", "gap/x/*"))',
             None)):
        path = sweep_file(tmp_path, body)
        lines = user_errors(capsys, "sweep", str(path), "--workdir", str(tmp_path / "w"))
        if expected is not None:
            assert len(lines) == 1 and expected in lines[0], (body, lines)
        else:  # both bad patterns, each once, with the kinds there are
            assert [line[:40] for line in lines] == ["clt: error: metrics.1 = 'gapp/*': names ",
                                                     "clt: error: metrics.2 = 'gap/x/*': names"]
            assert "here e.g. final/code, end/base/code, gap/shift/code" in lines[0]
    assert user_errors(capsys, "sweep", str(SMOKE_SWEEP), "--workdir", str(tmp_path / "w"), "--only", "nope*") == [
        "clt: error: --only = 'nope*': matches no run of the sweep; runs are named like 'replay=0,peak=1e-3' "
        "(see --dry-run)"]
    assert user_errors(capsys, "sweep", str(tmp_path / "missing.py"), "--workdir", "w") == [
        f"clt: error: SWEEP_CONFIG = '{tmp_path / 'missing.py'}': no such file; give the path of a get_config() "
        "file, e.g. configs/sweeps/smoke_replay_peak.py"]
    assert not (tmp_path / "w").exists()


def test_job_options_belong_to_their_launch_target(tmp_path, capsys):
    w = str(tmp_path / "w")
    assert user_errors(capsys, "sweep", str(SMOKE_SWEEP), "--workdir", w, "--nodes", "2") == [
        "clt: error: --nodes is for `clt sweep --launch slurm / gke`"]
    assert user_errors(capsys, "sweep", str(SMOKE_SWEEP), "--workdir", w, "--launch", "local") == [
        "clt: error: clt sweep --launch local needs --processes"]
    assert user_errors(capsys, "sweep", str(SMOKE_SWEEP), "--workdir", w, "--launch", "slurm", "--nodes", "1",
                       "--gpus-per-node", "8", "--processes", "2") == [
        "clt: error: --processes is for `clt sweep --launch local`, not slurm"]
    assert user_errors(capsys, "sweep", str(SMOKE_SWEEP)) == [
        "clt: error: --workdir = None: clt sweep needs a folder for its runs; add --workdir DIR"]
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------------------
# --dry-run, and --launch slurm through clt launch's own rendering.
# ----------------------------------------------------------------------------------------------------------
def test_dry_run_prints_every_run_and_its_overrides_and_creates_nothing(demo_data, tmp_path, capsys):
    w = tmp_path / "w"
    rc = cli.main(["sweep", str(SMOKE_SWEEP), "--workdir", str(w), "--dry-run", *smoke_overrides(demo_data)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"sweep smoke_replay_peak: 4 runs (replay 2 x peak 2; the base seed) of configs/smoke.py in {w}"
    assert lines[1] == "every run: " + " ".join(smoke_overrides(demo_data))
    assert [line.split() for line in lines[4:]] == [
        ["replay=0,peak=1e-3", "pending", "phases.shift.replay=0.0", "phases.shift.schedule.peak=0.001"],
        ["replay=0,peak=3e-3", "pending", "phases.shift.replay=0.0", "phases.shift.schedule.peak=0.003"],
        ["replay=0.25,peak=1e-3", "pending", "phases.shift.replay=0.25", "phases.shift.schedule.peak=0.001"],
        ["replay=0.25,peak=3e-3", "pending", "phases.shift.replay=0.25", "phases.shift.schedule.peak=0.003"]]
    assert not w.exists()


def test_launch_slurm_renders_one_job_per_run_and_submits_none(demo_data, tmp_path, capsys):
    w = tmp_path / "w"
    rc = cli.main(["sweep", str(SMOKE_SWEEP), "--workdir", str(w), "--launch", "slurm", "--nodes", "1",
                   "--gpus-per-node", "8", "--partition", "gpu", "--dry-run", "--only", "replay=0.25,*",
                   *smoke_overrides(demo_data)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "sweep smoke_replay_peak: 2 runs: 2 rendered (dry run), 0 skipped" in out
    assert "#SBATCH" not in out and err.count("clt: dry run: wrote") == 2  # the files hold the scripts
    scripts = sorted(w.glob("*/launch/job.sbatch"))
    assert [s.parent.parent.name for s in scripts] == ["replay=0.25,peak=1e-3", "replay=0.25,peak=3e-3"]
    names = set()
    for script in scripts:
        text = script.read_text()
        names.add(re.search(r"#SBATCH --job-name=(\S+)", text).group(1))
        assert "#SBATCH --partition=gpu" in text and f"--workdir {shlex.quote(str(script.parent.parent))}" in text
        peak = script.parent.parent.name.rsplit("=", 1)[1].replace("e-3", "")
        assert f"phases.shift.replay=0.25 phases.shift.schedule.peak=0.00{peak}" in text, text
        record = json.loads((script.parent / "launch.json").read_text())
        assert record["dry_run"] and "submitted" not in record
    assert len(names) == 2 and all(n.startswith("clt-smoke-replay-peak-") for n in names)
    assert sweep.run_state(str(scripts[0].parent.parent)) == "pending"  # a dry run submitted nothing
    launch_json = scripts[0].parent / "launch.json"
    launch_json.write_text(json.dumps({**json.loads(launch_json.read_text()), "submitted": "4242"}))
    assert sweep.run_state(str(scripts[0].parent.parent)) == "submitted"  # not submitted twice


def test_launch_gke_checks_every_point_against_the_job_and_renders_into_the_bucket(demo_data, gcs_store, capsys):
    from clt.data import store

    wd = gcs_store.url("sweeps", "s")
    job = ["--launch", "gke", "--accelerator", "tpu-v5p-64", "--image", "clt:1", "--dry-run"]
    lines = user_errors(capsys, "sweep", str(SMOKE_SWEEP), "--workdir", wd, *job)
    assert len(lines) == 4 and all(re.match(r"clt: error: sweep point \S+: batch_size = 8: .*32", line)
                                   for line in lines), lines  # 8 hosts x 4 chips: 32 devices
    rc = cli.main(["sweep", str(SMOKE_SWEEP), "--workdir", wd, *job, "--only", "replay=0,*", "batch_size=32",
                   "data.eval_batch=32"])
    out, err = capsys.readouterr()
    assert rc == 0 and "2 runs: 2 rendered (dry run), 0 skipped" in out, out + err
    for run in ("replay=0,peak=1e-3", "replay=0,peak=3e-3"):
        text = store.read_bytes(store.join(wd, run, "launch"), "jobset.yaml").decode()
        assert f"/gcs/{wd.removeprefix('gs://')}/{run}" in text and "phases.shift.replay=0.0" in text
        assert re.search(r"name: clt-smoke-replay-peak-[0-9a-f]{8}\n", text)
        assert sweep.run_state(store.join(wd, run)) == "pending"


# ----------------------------------------------------------------------------------------------------------
# The report, from run files written by hand: exact means, spreads and best marks.
# ----------------------------------------------------------------------------------------------------------
TWO_PHASES = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.data = dict(domains={"prose": "data/demo/prose", "code": "data/demo/code"}, seq_len=32)
    c.batch_size = 8
    c.phases = (dict(name="base", steps=4, mixture={"prose": 1.0}, schedule=dict(kind="constant", peak=1e-3)),
                dict(name="shift", steps=4, mixture={"code": 1.0}, schedule=dict(kind="constant", peak=1e-3)))
    c.monitor = dict(every=4, dense_every=1, dense_window=2, recovery_tol=0.02)
    return c
"""
# eval steps 0, 4 (the switch's baseline), 5, 6 (its window), 8 (the end); per run: {domain: {step: loss}}
PROSE_CODE = {
    "replay=0,seed=0": {"prose": {0: 5.0, 4: 3.0, 5: 3.5, 6: 3.25, 8: 3.0},
                        "code": {0: 6.0, 4: 5.0, 5: 4.0, 6: 3.5, 8: 3.0}},
    "replay=0,seed=1": {"prose": {0: 5.0, 4: 3.0, 5: 3.25, 6: 3.0, 8: 2.5},
                        "code": {0: 6.0, 4: 5.0, 5: 4.5, 6: 4.0, 8: 4.0}},
    "replay=0.25,seed=0": {"prose": {0: 5.0, 4: 3.0, 5: 3.125, 6: 3.0, 8: 2.625},
                           "code": {0: 6.0, 4: 5.0, 5: 4.25, 6: 3.75, 8: 3.5}},
    "replay=0.25,seed=1": {"prose": {0: 5.0, 4: 3.0, 5: 3.0625, 6: 3.0}, "code": {0: 6.0, 4: 5.0, 5: 4.0, 6: 3.5}},
}  # replay=0.25,seed=1 is still running (no step 8 yet); replay=0.5 has not started
TOKENS_PER_S = {"replay=0,seed=0": [100.0, 300.0, 200.0], "replay=0,seed=1": [400.0],
                "replay=0.25,seed=0": [500.0, 100.0, 1000.0], "replay=0.25,seed=1": [50.0]}


@pytest.fixture(scope="module")
def made_up_sweep(tmp_path_factory):
    """A sweep folder of hand-written runs: sweep.json from the sweep's own expansion, and each run's plan.json,
    metrics.jsonl (train rows with tokens/s, eval rows) and events.jsonl."""
    tmp = tmp_path_factory.mktemp("made_up")
    base = tmp / "two_phases.py"
    base.write_text(TWO_PHASES)
    spec = sweep.load_sweep(str(sweep_file(tmp, f"""
        dict(base={str(base)!r}, seeds=(0, 1), axes=(dict(key="phases.shift.replay", values=(0.0, 0.25, 0.5),
                                                           label="replay"),),
             metrics=("final/*", "gap/shift/prose", "recovery/*", "forgetting/*", "adaptation/*", "tokens_per_s"))""",
                                          "made_up.py")))
    wd = tmp / "sweep"
    sweep.write_manifest(str(wd), spec, sweep.expand(spec))
    cfg = config.load(str(base))
    pl = plan.resolve(cfg)
    for name, curves in PROSE_CODE.items():
        run = wd / name
        run.mkdir()
        resume.write_record(run, pl, {}, cfg)
        rows = [dict(step=s, phase="base", loss=4.0, tokens_per_s=v) for s, v in enumerate(TOKENS_PER_S[name])]
        rows += [{"step": s, "phase": pl.phase_at(min(s, 7)).name,
                  **{f"eval/{d}/loss": c[s] for d, c in curves.items()}}
                 for s in sorted(curves["prose"])]
        rows.sort(key=lambda r: r["step"])
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = 8 in curves["prose"]
        (run / "events.jsonl").write_text(json.dumps(dict(event="phase_start", step=0, phase="base")) + "\n"
                                          + (json.dumps(dict(event="finished", step=8)) + "\n" if done else ""))
    path = sweep.write_sweep_report(wd)
    return wd, path


def test_report_rows_are_means_and_spreads_over_seeds_with_the_best_marked(made_up_sweep):
    wd, _ = made_up_sweep
    rows = list(csv.DictReader((wd / "report" / "results.csv").open()))
    assert [(r["point"], r["replay"], r["runs"], r["finished"]) for r in rows] == [
        ("replay=0", "0", "2", "2"), ("replay=0.25", "0.25", "2", "1"), ("replay=0.5", "0.5", "2", "0")]
    a, b, c = rows
    # final: the eval at the plan's end (the running seed has none yet)
    assert (float(a["final/prose"]), float(a["final/prose std"])) == (2.75, pytest.approx(0.5 / 2 ** 0.5, rel=1e-12))
    assert (float(b["final/prose"]), b["final/prose std"]) == (2.625, "")
    assert (float(a["final/code"]), float(b["final/code"])) == (3.5, 3.5)
    # gap of prose at the switch (baseline 3.0 at step 4, window 5-6): 0.5 and 0.25; 0.125 and 0.0625
    assert float(a["gap/shift/prose"]) == 0.375 and float(b["gap/shift/prose"]) == 0.09375
    assert float(b["gap/shift/prose std"]) == pytest.approx(0.0625 / 2 ** 0.5, rel=1e-12)
    # recovery: back within 0.02 at step 8 and 6 (4 and 2 steps after the switch); within the window for B
    assert float(a["recovery/shift/prose"]) == 3.0 and float(b["recovery/shift/prose"]) == 2.0
    assert float(a["recovery/shift/code"]) == 0.0  # code's loss only fell: no gap, recovery 0
    # prose's weight fell at the switch: forgetting = L(8) - L(4); code's rose: adaptation = L(4) - L(8)
    assert float(a["forgetting/shift/prose"]) == -0.25 and float(b["forgetting/shift/prose"]) == -0.375
    assert float(a["adaptation/shift/code"]) == 1.5 and float(b["adaptation/shift/code"]) == 1.5
    # tokens/s: the median of each run's log rows (200, 400; 500, 50), then the mean over seeds
    assert float(a["tokens_per_s"]) == 300.0 and float(b["tokens_per_s"]) == 275.0
    assert "gap/shift/code" not in a  # not asked for
    assert all(c[k] == "" for k in c if "/" in k or k == "tokens_per_s")
    # best: the lowest loss, gap, recovery and forgetting, the highest adaptation (a tie: both) and tokens/s
    assert a["best"].split(";") == ["final/code", "recovery/shift/code", "adaptation/shift/code", "tokens_per_s"]
    assert b["best"].split(";") == ["final/code", "final/prose", "gap/shift/prose", "recovery/shift/code",
                                    "recovery/shift/prose", "forgetting/shift/prose", "adaptation/shift/code"]
    assert c["best"] == ""


def test_report_md_marks_the_best_and_shows_the_spread(made_up_sweep):
    wd, path = made_up_sweep
    assert path == wd / "report" / "results.md"
    table = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {row.split("|")[1].strip(): dict(zip(head, (c.strip() for c in row.strip("|").split("|"))))
             for row in table[1:]}
    assert head[:2] == ["replay", "finished"]
    assert cells["0"]["finished"] == "2/2" and cells["0.25"]["finished"] == "1/2" and cells["0.5"]["finished"] == "0/2"
    assert cells["0"]["final/prose"] == "2.750 ± 0.354" and cells["0.25"]["final/prose"] == "**2.625**"
    assert cells["0"]["gap/shift/prose"] == "0.375 ± 0.177"
    assert cells["0.25"]["gap/shift/prose"] == "**0.094** ± 0.044"
    assert cells["0"]["tokens_per_s"] == "**300.000** ± 141.421" and cells["0.5"]["tokens_per_s"] == "-"
    runs = list(csv.DictReader((wd / "report" / "runs.csv").open()))
    assert [(r["run"], r["state"], r["final/prose"]) for r in runs] == [
        ("replay=0,seed=0", "finished", "3.0"), ("replay=0,seed=1", "finished", "2.5"),
        ("replay=0.25,seed=0", "finished", "2.625"), ("replay=0.25,seed=1", "interrupted", ""),
        ("replay=0.5,seed=0", "pending", ""), ("replay=0.5,seed=1", "pending", "")]


def test_report_plots_draw_every_metric_against_the_axis_and_every_run(made_up_sweep, tmp_path, monkeypatch):
    wd, _ = made_up_sweep
    figures = {}
    monkeypatch.setattr(sweep, "_save", lambda fig, path: figures.__setitem__(pathlib.Path(path).name, fig))
    sweep.write_sweep_report(wd, out=tmp_path)
    assert sorted(figures) == ["eval_code.png", "eval_prose.png", "metrics_vs_replay.png"]
    panels = [ax for ax in figures["metrics_vs_replay.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels][:3] == ["final/code", "final/prose", "gap/shift/prose"]  # plan order
    gap = panels[2]
    means = [line for line in gap.get_lines() if line.get_linestyle() == "-"]
    assert len(means) == 1 and list(means[0].get_xdata()) == [0, 1] and list(means[0].get_ydata()) == [0.375, 0.09375]
    dots = sorted(y for line in gap.get_lines() if line.get_marker() == "." for y in line.get_ydata())
    assert dots == [0.0625, 0.125, 0.25, 0.5]  # every run's own value
    curves = figures["eval_prose.png"].axes[0]
    assert len(curves.get_lines()) == 4 and len(curves.get_legend().get_texts()) == 2  # runs; points with runs
    assert (wd / "report" / "metrics_vs_replay.png").stat().st_size > 10_000  # the fixture's real files


def test_report_of_a_folder_without_sweep_json_is_one_line(tmp_path, capsys):
    assert user_errors(capsys, "sweep", "report", str(tmp_path)) == [
        f"clt: error: DIR = '{tmp_path}': has no sweep.json (not a sweep's folder, or the sweep never started); "
        "give the --workdir of a `clt sweep`"]


# ----------------------------------------------------------------------------------------------------------
# A real 2 x 2 sweep of configs/smoke.py: two runs, then one killed mid-run, then the rest (resume, skip, fresh).
# ----------------------------------------------------------------------------------------------------------
def clt_sweep(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run([sys.executable, "-m", "clt.cli", "sweep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def events(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


KILL_AT = 15  # after the saves at 8 and 12 (phase base's end) have started, before the next one (16)


@pytest.fixture(scope="module")
def real_sweep(demo_data, tmp_path_factory):
    """configs/sweeps/smoke_replay_peak.py in three invocations, as a user whose machine fails would run it:
    1. `--only 'replay=0,*'`: two runs finish; 2. one more run, killed (SIGKILL) after step 15;
    3. the whole sweep: two finished runs skipped, the killed one resumed, the last one trained."""
    wd = tmp_path_factory.mktemp("real_sweep") / "sweep"
    data = smoke_overrides(demo_data)
    first = clt_sweep("configs/sweeps/smoke_replay_peak.py", "--workdir", str(wd), "--only", "replay=0,*", "--quiet",
                      *data)
    killed = clt_sweep("configs/sweeps/smoke_replay_peak.py", "--workdir", str(wd), "--only", "replay=0.25,peak=1e-3",
                       f"debug.kill_at_step={KILL_AT}", "--quiet", *data)
    last = clt_sweep("configs/sweeps/smoke_replay_peak.py", "--workdir", str(wd), "--quiet", *data)
    return wd, first, killed, last


def test_sweep_runs_each_point_in_its_own_folder_with_a_progress_line(real_sweep):
    wd, first, _, _ = real_sweep
    assert first.returncode == 0, first.stderr[-3000:]
    assert [line for line in first.stdout.splitlines() if line.startswith("sweep")] == [
        "sweep 1/2: replay=0,peak=1e-3 (0 done, 0 skipped)", "sweep 2/2: replay=0,peak=3e-3 (1 done, 0 skipped)",
        "sweep smoke_replay_peak: 2 runs: 2 done, 0 skipped"]
    manifest = json.loads((wd / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == ["replay=0,peak=1e-3", "replay=0,peak=3e-3",
                                                     "replay=0.25,peak=1e-3", "replay=0.25,peak=3e-3"]
    record = resume.read_record(wd / "replay=0,peak=3e-3")
    assert (record.config.phases[1].replay.share, record.config.phases[1].schedule.peak) == (0.0, 3e-3)


def test_an_interrupted_run_resumes_and_finished_runs_are_skipped(real_sweep):
    wd, _, killed, last = real_sweep
    run = wd / "replay=0.25,peak=1e-3"
    assert killed.returncode == 1 and "1 failed: replay=0.25,peak=1e-3 (interrupted, exit -9)" in killed.stdout, \
        killed.stdout + killed.stderr[-3000:]
    assert last.returncode == 0, last.stderr[-3000:]
    assert [line for line in last.stdout.splitlines() if line.startswith("sweep")] == [
        "sweep 1/4: replay=0,peak=1e-3: finished before, skipped",
        "sweep 2/4: replay=0,peak=3e-3: finished before, skipped",
        "sweep 3/4: replay=0.25,peak=1e-3 (resuming) (0 done, 2 skipped)",
        "sweep 4/4: replay=0.25,peak=3e-3 (1 done, 2 skipped)",
        "sweep smoke_replay_peak: 4 runs: 2 done, 2 skipped"]
    # resumed from a checkpoint before the kill (8, or 12 when its async save had completed), not from scratch
    assert [e["step"] for e in events(run) if e["event"] == "resume"] in ([8], [12])
    assert [e["event"] for e in events(run)][-1] == "finished"
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 27  # one run's rows, as if never interrupted
    assert not any(e["event"] == "resume" for e in events(wd / "replay=0.25,peak=3e-3"))


def test_a_finished_sweep_reruns_nothing(real_sweep):
    wd, *_ = real_sweep
    before = {p: p.stat().st_mtime_ns for p in wd.glob("*/metrics.jsonl")}
    again = clt_sweep("configs/sweeps/smoke_replay_peak.py", "--workdir", str(wd), "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep smoke_replay_peak: 4 runs: 0 done, 4 skipped" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in wd.glob("*/metrics.jsonl")} == before and len(before) == 4


def test_the_real_sweeps_report_has_a_row_per_point_and_its_plots(real_sweep, capsys):
    wd, _, _, last = real_sweep
    assert f"report: {wd / 'report' / 'results.md'}" in last.stdout
    rc = cli.main(["sweep", "report", str(wd)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == str(wd / "report" / "results.md")
    assert out[1].split() == ["replay", "peak", "finished", "final/prose", "final/code", "gap/shift/prose",
                              "gap/shift/code", "forgetting/shift/prose", "adaptation/shift/code", "tokens_per_s"]
    rows = list(csv.DictReader((wd / "report" / "results.csv").open()))
    assert [(r["replay"], r["peak"], r["finished"]) for r in rows] == [
        ("0", "1e-3", "1"), ("0", "3e-3", "1"), ("0.25", "1e-3", "1"), ("0.25", "3e-3", "1")]
    for r in rows:  # every metric of every point, from its metrics.jsonl
        assert all(np.isfinite(float(r[k])) for k in r if k.startswith(("final/", "gap/", "forgetting/",
                                                                         "adaptation/", "tokens_per_s"))
                   and not k.endswith(" std"))  # one seed: no spread
    finals = {(r["replay"], r["peak"]): float(r["final/code"]) for r in rows}
    best = min(finals, key=finals.get)
    assert "final/code" in rows[list(finals).index(best)]["best"].split(";")
    for name in ("metrics_vs_replay.png", "metrics_vs_peak.png", "eval_prose.png", "eval_code.png"):
        image = mpimg.imread(wd / "report" / name)
        assert image.shape[0] > 300 and image[..., :3].std() > 0.05, name  # drawn, not blank
