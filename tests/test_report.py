"""`clt report`: report.md, stability.json and plots from a real smoke run's workdir, finished and in progress."""

import json
import pathlib
import re
import shutil

import matplotlib.image as mpimg
import pytest
from conftest import smoke_overrides

from clt import cli, config, monitor, plan, report, train
from clt.metrics import read_jsonl


@pytest.fixture(scope="module")
def smoke(demo_data, tmp_path_factory):
    """One finished smoke run and its report."""
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data))
    wd = tmp_path_factory.mktemp("report_run")
    train.train(cfg, str(wd), progress=False)
    return cfg, wd, report.write_report(wd)


def copy_run(wd: pathlib.Path, dest: pathlib.Path, keep_rows: float) -> pathlib.Path:
    """plan.json and events of a run with only the first `keep_rows` of its metrics lines: a run in progress."""
    dest.mkdir()
    for name in ("plan.json", "events.jsonl"):
        shutil.copy(wd / name, dest / name)
    lines = (wd / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dest / "metrics.jsonl").write_text("".join(lines[:int(len(lines) * keep_rows)]))
    return dest


def test_report_md_has_the_plan_stability_and_image_links(smoke):
    cfg, wd, path = smoke
    assert path == wd / "report" / "report.md"
    md = path.read_text()
    pl = plan.resolve(cfg)
    assert f"plan `{pl.digest()}`" in md and f"step {pl.total_steps} / {pl.total_steps}" in md and "**finished**" in md
    assert "| phase | steps | n_steps |" in md and "| base | 0-11 | 12 |" in md
    assert "| switch step | kind | phase | domain | baseline | gap | gap step | recovery steps |" in md
    for sw in pl.switches():
        for d in pl.domains:
            assert re.search(rf"^\| {sw['step']} \| {sw['kind']} \| {sw['phase']} \| {d} \|", md, re.M), (sw, d)
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert {"loss.png", "mixture.png", "train_loss.png"} <= set(links)
    assert {f"switch_{sw['step']}.png" for sw in pl.switches()} <= set(links)
    for link in links:
        assert (path.parent / link).is_file(), link
    assert "## Latest eval (step 28)" in md and "## Alerts" in md


def test_stability_json_is_monitor_stability_recomputed(smoke):
    cfg, wd, path = smoke
    entries = json.loads((path.parent / "stability.json").read_text())
    pl = plan.resolve(cfg)
    expected = monitor.stability(pl, read_jsonl(wd / "metrics.jsonl"), cfg.monitor)
    assert len(entries) == len(expected) == len(pl.switches()) * len(pl.domains)
    for got, want in zip(entries, expected):
        end = {"forgetting", "adaptation"} & set(got)
        assert len(end) == 1, got  # every domain's weight changes at the smoke run's switches
        assert set(got) == {"switch_step", "kind", "phase", "domain", "baseline", "gap", "gap_step",
                            "recovery_steps"} | end
        assert got == {k: want[k] for k in got}
        assert f"{got['gap']:+.3f}" in path.read_text()


def test_plots_exist_and_are_not_blank(smoke):
    cfg, wd, path = smoke
    names = ["loss.png", "mixture.png", "train_loss.png"] + [f"switch_{s['step']}.png"
                                                              for s in plan.resolve(cfg).switches()]
    for name in names:
        assert (path.parent / name).stat().st_size > 15_000, name
        pixels = mpimg.imread(path.parent / name)[..., :3]
        assert (pixels < 0.95).any(-1).mean() > 0.1, f"{name} is mostly blank"  # titles alone cover ~2%


def test_a_run_in_progress_reports_what_it_has(smoke, tmp_path):
    cfg, wd, _ = smoke
    part = copy_run(wd, tmp_path / "part", keep_rows=0.5)
    path = report.write_report(part, out=tmp_path / "out")
    md = path.read_text()
    assert "**in progress**" in md and "Switches without a baseline eval yet" in md
    pl, rows = plan.resolve(cfg), read_jsonl(part / "metrics.jsonl")
    done = max(r["step"] for r in rows if "eval/code/loss" in r)  # the last eval: how far the monitor can see
    trained = max(r["step"] + 1 for r in rows if "loss" in r)  # a train row's step is the update it made
    assert 0 < done < pl.total_steps and f"step {max(done, trained)} / {pl.total_steps}" in md
    entries = json.loads((tmp_path / "out" / "stability.json").read_text())
    reached = [sw["step"] for sw in pl.switches() if sw["step"] <= done]
    assert reached and [e["switch_step"] for e in entries] == [s for s in reached for _ in pl.domains]
    assert entries == [{k: e[k] for k in entry} for e, entry in
                       zip(monitor.stability(pl, rows, cfg.monitor), entries)]
    for e in entries:  # a phase end not yet evaluated: neither forgetting nor adaptation is known
        assert ("forgetting" in e or "adaptation" in e) == (pl.phase_at(e["switch_step"]).end <= done)
    assert (tmp_path / "out" / f"switch_{reached[0]}.png").is_file()


def test_an_empty_metrics_file_says_so(smoke, tmp_path):
    _, wd, _ = smoke
    empty = copy_run(wd, tmp_path / "empty", keep_rows=0)
    md = report.write_report(empty).read_text()
    assert "No metrics yet" in md and "step 0 / 28" in md and "No switch has been evaluated yet" in md
    assert json.loads((empty / "report" / "stability.json").read_text()) == []
    assert (empty / "report" / "mixture.png").is_file() and not (empty / "report" / "loss.png").exists()


def test_cli_report_prints_the_path(smoke, tmp_path, capsys):
    wd = copy_run(smoke[1], tmp_path / "run", keep_rows=0)  # no metrics: quick to render
    assert cli.main(["report", str(wd), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")


def test_cli_report_without_plan_json_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no plan.json" in err and str(tmp_path) in err
