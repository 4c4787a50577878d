"""`clt report`: report.md, stability.json and plots from a real smoke run's workdir, finished and in progress."""

import json
import pathlib
import re
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import SMOKE

from clt import cli, config, monitor, plan, plan_view, report
from clt.metrics import read_jsonl


@pytest.fixture(scope="module")
def smoke(smoke_run, tmp_path_factory):
    """The session's finished smoke run (a copy: the report is written into it) and its report."""
    cfg, shared, _ = smoke_run
    wd = tmp_path_factory.mktemp("report_run") / "run"
    shutil.copytree(shared, wd)
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
    assert md.startswith(f"# Run report: {wd.name}\n") and f"Plan `{pl.digest()}`" in md
    assert f"step {pl.total_steps} / {pl.total_steps}" in md and "**finished**" in md
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


# ---- the plots themselves: figures captured before they are written, on runs whose eval losses are made up
@pytest.fixture
def figures(monkeypatch):
    """The figures report functions draw, by file name, instead of writing them."""
    import matplotlib.pyplot as plt

    figs = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.__setitem__(pathlib.Path(path).name, fig))
    yield figs
    for fig in figs.values():
        plt.close(fig)


def made_up_run(tmp_path, curves: dict[str, dict[int, float]], name: str = "my-run") -> report.Run:
    """The smoke plan (switches at 12, 22, 25; recovery_tol 0.02) with these eval losses, in a workdir `name`."""
    cfg = config.load(str(SMOKE), [])
    pl = plan.resolve(cfg)
    steps = sorted({t for c in curves.values() for t in c})
    rows = [{"step": t, **{f"eval/{d}/loss": c[t] for d, c in curves.items() if t in c}} for t in steps]
    return report.Run(workdir=tmp_path / name, plan=pl, digest=pl.digest(), monitor=cfg.monitor, rows=rows,
                      events=[])


def draw_switch(run: report.Run, s0: int, figures: dict):
    entries = [e for e in monitor.stability(run.plan, run.rows, run.monitor) if e["switch_step"] == s0]
    report.plot_switch(run, s0, entries, pathlib.Path(f"switch_{s0}.png"))
    fig = figures[f"switch_{s0}.png"]
    return {e["domain"]: ax for e, ax in zip(entries, [a for a in fig.axes if a.get_visible()])}, entries


def gap_marks(ax) -> int:
    """Red triangles and arrows: what says 'gap' on a panel."""
    from matplotlib.text import Annotation

    return (sum(line.get_marker() == "v" for line in ax.get_lines())
            + sum(isinstance(t, Annotation) and t.arrow_patch is not None for t in ax.texts))


STEPS = list(range(0, 29, 2)) + [25]
# at the first switch (baseline 3.988 at 12): prose rises +0.3 at 14 and is back within tol at 18; code rises
# +0.01 at 14, within recovery_tol 0.02
BUMPS = {"prose": {14: 0.3, 16: 0.1, 18: 0.005}, "code": {14: 0.01}}
GAP_CURVES = {d: {t: 4.0 - 0.001 * min(t, 12) + BUMPS[d].get(t, 0.0) for t in STEPS} for d in BUMPS}
FLAT_CURVES = {d: {t: 3.8 - 0.0006 * t for t in STEPS} for d in ("prose", "code")}  # falls 0.017 in all


def test_switch_ylim_leaves_room_around_the_tolerance_band():
    lo, hi = report.switch_ylim([4.062, 4.057, 4.051, 4.049], baseline=4.057, tol=0.02)
    assert hi - lo >= 5 * 0.02, "the band (2 tol wide) would fill the panel"
    assert lo < 4.057 - 0.02 - 0.01 and hi > 4.057 + 0.02 + 0.01 and lo < 4.049 and hi > 4.062
    lo, hi = report.switch_ylim([1.8, 1.97, 1.77], baseline=1.8, tol=0.02)  # a real gap sets the range itself
    assert 1.97 < hi < 2.0 and 1.7 < lo < 1.8 - 2.5 * 0.02  # the gap's top, not 2.5 tol, sets the top
    lo, hi = report.switch_ylim([2.0, 2.0], baseline=2.0, tol=0.0)  # no tolerance: still a usable range
    assert hi > lo


def test_a_flat_switch_panel_shows_the_band_as_a_band(tmp_path, figures):
    run = made_up_run(tmp_path, FLAT_CURVES)
    panels, entries = draw_switch(run, 22, figures)
    for e in entries:
        lo, hi = panels[e["domain"]].get_ylim()
        assert hi - lo >= 5 * run.monitor.recovery_tol, (e["domain"], lo, hi)
        assert lo < e["baseline"] - run.monitor.recovery_tol < e["baseline"] + run.monitor.recovery_tol < hi


@pytest.mark.parametrize("s0", [12, 22])
def test_gap_marker_and_panel_title_agree(tmp_path, figures, s0):
    run = made_up_run(tmp_path, GAP_CURVES if s0 == 12 else FLAT_CURVES)
    panels, entries = draw_switch(run, s0, figures)
    verdicts = {}
    for e in entries:
        ax, title = panels[e["domain"]], panels[e["domain"]].get_title()
        assert ("no gap" in title) == (gap_marks(ax) == 0), (e["domain"], title, gap_marks(ax))
        verdicts[e["domain"]] = "no gap" not in title
    if s0 == 12:  # +0.3 is a gap (marked at its step); +0.01 is within tol 0.02, as the monitor counts it
        assert verdicts == {"prose": True, "code": False}
        prose = panels["prose"].get_title()
        assert "gap +0.300 at 14" in prose and "recovered in 6 steps" in prose
        assert [e["recovery_steps"] for e in entries if e["domain"] == "code"] == [0]
    else:
        assert verdicts == {"prose": False, "code": False}  # the highest point is below the baseline


def test_gap_verdict_uses_the_recovery_tolerance():
    e = dict(gap=0.3, gap_step=14)
    assert report.gap_verdict(e, 0.02) == (True, "gap +0.300 at 14")
    assert report.gap_verdict(dict(e, gap=0.02), 0.02)[0] is False  # at tol: recovered at once, so no gap
    assert report.gap_verdict(dict(e, gap=-0.006), 0.02) == (False, "no gap (-0.006)")
    assert report.gap_verdict(dict(gap=None, gap_step=None), 0.02) == (False, "no eval in the window")


def test_plots_are_titled_with_the_run_name_and_the_digest_small(smoke, tmp_path, figures):
    _, wd, _ = smoke
    run_dir = copy_run(wd, tmp_path / "june-run", keep_rows=1.0)
    report.write_report(run_dir, out=tmp_path / "out")
    digest = json.loads((run_dir / "plan.json").read_text())["digest"]
    assert {"loss.png", "mixture.png", "train_loss.png", "switch_12.png"} <= set(figures)
    for name, fig in figures.items():
        texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
                 if t.get_text()]
        titles = [t for t in texts if t.get_text().startswith("june-run: ")]
        subs = [t for t in texts if t.get_text() == f"plan {digest}"]
        assert len(titles) == 1 and len(subs) == 1, (name, [t.get_text() for t in texts])
        assert subs[0].get_fontsize() < titles[0].get_fontsize(), name
        assert not any(digest in t.get_text() for t in texts if t is not subs[0]), name


def test_replayed_shares_are_opaque_tints_hatched_in_their_domain_colour(tmp_path, figures):
    from matplotlib.colors import to_rgba

    run = made_up_run(tmp_path, FLAT_CURVES)
    report.plot_mixture(run, plan_view.plan_curves(run.plan), pathlib.Path("mixture.png"))
    ax = figures["mixture.png"].axes[0]
    slots = {"code", "prose", "replay/code", "replay/prose"}
    polys = {p.get_label(): p for p in ax.collections if p.get_label() in slots}
    assert set(polys) == slots
    for d in ("code", "prose"):
        fresh, replayed = polys[d], polys[f"replay/{d}"]
        face = to_rgba(replayed.get_facecolor()[0])
        assert face[3] == 1.0, "a transparent fill lets the hatching fade with it"
        assert replayed.get_hatch() and replayed.get_hatch().count("/") >= 3 and not fresh.get_hatch()
        assert face[:3] != to_rgba(fresh.get_facecolor()[0])[:3]  # a tint, not the fresh colour
        assert to_rgba(replayed.get_edgecolor()[0])[:3] == to_rgba(fresh.get_facecolor()[0])[:3]  # hatch colour


def test_the_mixture_plot_reaches_the_last_step(tmp_path, figures):
    """step='post' ends the fill at the last plotted step: the final step (27 of 28) must not be blank."""
    run = made_up_run(tmp_path, FLAT_CURVES)
    report.plot_mixture(run, plan_view.plan_curves(run.plan), pathlib.Path("mixture.png"))
    fig = figures["mixture.png"]
    ax = fig.axes[0]
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    h = pixels.shape[0]
    for y in (0.1, 0.5, 0.95):
        px, py = ax.transData.transform((run.plan.total_steps - 0.4, y))
        assert pixels[int(h - py), int(px)].min() < 0.9, f"blank at the last step, share {y}"
