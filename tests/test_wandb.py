"""log.wandb: a real `clt train` in W&B offline mode, read back from the .wandb files W&B writes (the files
`wandb sync` uploads): the metrics rows and events equal metrics.jsonl's and events.jsonl's, the config and
plan are the run's, a preempted and resumed run is one W&B run, and W&B failures never stop training.

Nothing here reaches the network: the mode is offline, and W&B's server address points at a closed local port
(an online call would fail, and the tests with it). W&B's own folders are the test's temporary folders."""

import json
import logging
import pathlib
import re
import struct
import sys
import time

import pytest
from conftest import SMOKE, smoke_config, smoke_overrides

from clt import cli, config, train
from clt.config import ConfigError
from clt.metrics import WANDB_ID_FILE, WandbSink, read_jsonl

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

TRACKING = ("log.wandb.project=test", "log.wandb.mode=offline", "log.wandb.group=sweep-a",
            "log.wandb.tags=('lr=3e-3', 'replay=0.25')")


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """W&B quiet, offline-safe and writing only under a temporary folder, for this module's tests."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true",
                               WANDB_X_DISABLE_STATS="true", WANDB_BASE_URL="http://127.0.0.1:9",
                               WANDB_CONFIG_DIR=home / "config", WANDB_CACHE_DIR=home / "cache",
                               WANDB_DATA_DIR=home / "data", WANDB_ARTIFACT_DIR=home / "artifacts").items():
            mp.setenv(key, str(value))
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_MODE", raising=False)  # log.wandb.mode decides
        yield home


# ----------------------------------------------------------------------------------------------------------
# Reading W&B's offline files: a LevelDB-style log of `Record` protobufs (wandb 0.31 has no Python reader).
# ----------------------------------------------------------------------------------------------------------
BLOCK, HEADER = 32768, 7  # the file's block size; a chunk's header: crc32 (4), length (2), type (1)
FULL, LAST = 1, 4


def read_records(path: pathlib.Path) -> list:
    """Every Record of a run-<id>.wandb file, in order (chunks FULL, or FIRST/MIDDLE.../LAST)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, data[:7]
    pos, pending, out = 7, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if pos + HEADER + n > len(data):  # being written
            break
        pending += data[pos + HEADER:pos + HEADER + n]
        pos += HEADER + n
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_runs(wd: pathlib.Path, timeout: float = 30.0) -> list[list]:
    """The records of each offline run folder of the workdir, oldest first (one per `clt train`).

    `run.finish()` returns before W&B's service has written the file out: wait for each file's exit record."""
    out = []
    for folder in sorted((wd / "wandb").glob("offline-run-*")):
        file, deadline = next(folder.glob("run-*.wandb")), time.monotonic() + timeout
        while not of_type(records := read_records(file), "exit") and time.monotonic() < deadline:
            time.sleep(0.05)
        out.append(records)
    return out


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list) -> list[dict]:
    """The logged rows, without W&B's own `_` keys."""
    rows = []
    for h in of_type(records, "history"):
        row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in h.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def w_steps(records: list) -> list[int]:
    return [json.loads(next(i.value_json for i in h.item if "_step" in (i.key, *i.nested_key)))
            for h in of_type(records, "history")]


# ----------------------------------------------------------------------------------------------------------
# One preempted and resumed run, shared by the tests that read it.
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked(wandb_env, demo_data, tmp_path_factory):
    """A smoke run with W&B offline: `clt train` preempted after step 10, then the same command again."""
    wd = tmp_path_factory.mktemp("tracked")
    argv = ["train", str(SMOKE), "--workdir", str(wd), "--quiet",
            *smoke_overrides(demo_data, *TRACKING, "debug.preempt_at_step=10")]
    assert cli.main(argv) == 0
    last = read_jsonl(wd / "events.jsonl")[-1]
    assert (last["event"], last["step"]) == ("preempted", 10)
    assert cli.main(argv) == 0
    return wd


def test_a_resumed_run_is_one_wandb_run_with_the_group_tags_and_name(tracked):
    runs = offline_runs(tracked)
    assert len(runs) == 2  # one offline folder per invocation, both of the same run: `wandb sync` joins them
    run_id = (tracked / WANDB_ID_FILE).read_text().strip()
    for records in runs:
        (run,) = of_type(records, "run")
        assert (run.run_id, run.project, run.run_group, list(run.tags), run.display_name) == (
            run_id, "test", "sweep-a", ["lr=3e-3", "replay=0.25"], tracked.name)
        steps = w_steps(records)
        assert steps == sorted(set(steps))  # W&B's own counter only increases; clt's step is a metric
        (defined,) = [m for m in of_type(records, "metric") if m.glob_name == "*"]
        assert defined.step_metric == "step"  # clt's step is the x-axis of every chart
        assert of_type(records, "exit")[0].exit_code == 0


def test_wandb_rows_and_events_equal_the_run_files(tracked):
    rows = [r for records in offline_runs(tracked) for r in history(records)]
    metrics = [r for r in rows if "event" not in r]
    events = [r for r in rows if "event" in r]
    assert metrics == read_jsonl(tracked / "metrics.jsonl")  # every value exact, in order, over both runs
    assert [json.loads(e["event"]) for e in events] == read_jsonl(tracked / "events.jsonl")
    for e in events:  # a marker per event kind on the step axis
        parsed = json.loads(e["event"])
        assert e["step"] == parsed["step"] and e[f"event/{parsed['event']}"] == 1
    assert {"resume", "preempted", "checkpoint", "phase_start", "stability", "finished"} <= {
        json.loads(e["event"])["event"] for e in events}
    assert any("loss" in r for r in metrics) and any("eval/prose/loss" in r for r in metrics)


def test_the_wandb_config_is_the_resolved_config_and_plan(tracked):
    record = json.loads((tracked / "plan.json").read_text())
    for records in offline_runs(tracked):
        (run,) = of_type(records, "run")
        sent = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
        assert sent == dict(record["config"], plan=dict(record["plan"], digest=record["digest"]),
                            workdir=str(tracked.resolve()))
        assert sent["log"]["wandb"] == dict(project="test", entity="", group="sweep-a", name="",
                                            tags=["lr=3e-3", "replay=0.25"], mode="offline", dir="")
        assert sent["optim"]["b2"] == 0.95 and [p["name"] for p in sent["plan"]["phases"]] == ["base", "shift",
                                                                                               "anneal"]
        files = {f.path: f.policy for r in of_type(records, "files") for f in r.files}
        assert {"plan.json", "events.jsonl", "metrics.jsonl"} <= files.keys()


# ----------------------------------------------------------------------------------------------------------
# W&B never stops a run.
# ----------------------------------------------------------------------------------------------------------
def test_a_failing_wandb_log_is_a_warning_and_training_goes_on(wandb_env, demo_data, tmp_path, monkeypatch,
                                                                caplog):
    def refuse(self, *args, **kwargs):
        raise ConnectionError("W&B is down")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", refuse)
    cfg = smoke_config(demo_data, *TRACKING, "phases.0.steps=4", "phases.1.steps=4", "phases.2.steps=2")
    with caplog.at_level(logging.WARNING, logger="clt"):
        result = train.train(cfg, str(tmp_path), progress=False)
    assert result["final_step"] == 10 and not result["stopped"]
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("W&B log failed")]
    assert len(failed) == WandbSink.MAX_WARNINGS and "ConnectionError: W&B is down" in failed[0]
    assert any(re.fullmatch(r"W&B: \d+ calls failed in all", r.getMessage()) for r in caplog.records)
    last = read_jsonl(tmp_path / "events.jsonl")[-1]
    assert (last["event"], last["step"]) == ("finished", 10)
    (records,) = offline_runs(tmp_path)
    assert history(records) == [] and of_type(records, "exit")[0].exit_code == 0


def test_a_failing_wandb_init_leaves_a_sink_that_does_nothing(wandb_env, tmp_path, monkeypatch, caplog):
    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = config.WandbConfig(project="test", mode="online")
    with caplog.at_level(logging.WARNING, logger="clt"):
        sink = WandbSink(tmp_path, cfg, {})
        sink.write(dict(step=0, loss=1.0))
        sink.event(dict(event="alert", step=0, alert="gap", message="m"))
        sink.close()
    assert sink.run is None
    assert [r.getMessage() for r in caplog.records] == [
        "W&B init failed (UsageError: api_key not configured); training continues, metrics.jsonl has every row"]


def test_alerts_preemption_and_stops_reach_wandb(wandb_env, tmp_path):
    """Without training: an alert is a W&B alert, `preempted` marks the run, `stopped` fails it."""
    sink = WandbSink(tmp_path, config.WandbConfig(project="test", mode="offline", name="n"), {"seed": 1})
    sink.write(dict(step=3, phase="base", loss=2.5, lr=1e-3))
    alert = dict(event="alert", step=4, alert="gap", value=0.5, message="stability gap 0.500 > 0.1 on prose")
    for event in (alert, dict(event="preempted", step=5), dict(event="stopped", step=5, reason="x")):
        sink.event(event)
    sink.close()
    sink.close()  # a second close does nothing
    (records,) = offline_runs(tmp_path)
    (sent,) = of_type(records, "alert")
    assert (sent.title, sent.text, sent.level) == ("clt gap alert", alert["message"], "WARN")
    assert of_type(records, "preempting") and of_type(records, "exit")[0].exit_code == 1
    assert history(records)[0] == dict(step=3, phase="base", loss=2.5, lr=1e-3)
    assert [json.loads(r["event"]) for r in history(records)[1:]] == [alert, dict(event="preempted", step=5),
                                                                      dict(event="stopped", step=5, reason="x")]


def test_an_empty_mode_is_wandb_s_default_from_the_environment(wandb_env, tmp_path, monkeypatch):
    """log.wandb.mode="" (the default) leaves the mode to W&B: a cluster's WANDB_MODE=offline is honoured."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = WandbSink(tmp_path, config.WandbConfig(project="test"), {})
    assert sink.run is not None
    sink.close()
    (records,) = offline_runs(tmp_path)
    assert of_type(records, "run")[0].project == "test"


# ----------------------------------------------------------------------------------------------------------
# Configuration errors: one line, before any heavy work.
# ----------------------------------------------------------------------------------------------------------
def test_a_missing_wandb_package_is_one_line_naming_the_field_and_the_fix(demo_data, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"^log.wandb.project = 'test': needs the wandb package.*; "
                                          r"pip install 'clt\[wandb\]'"):
        WandbSink.require("test")
    wd = tmp_path / "w"
    rc = cli.main(["train", str(SMOKE), "--workdir", str(wd), *smoke_overrides(demo_data, *TRACKING)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clt: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert re.match(r"clt: error: log.wandb.project = 'test': needs the wandb package.*pip install 'clt\[wandb\]'",
                    errors[0])
    assert not (wd / "plan.json").exists()  # refused before the run started
    train_cfg = smoke_config(demo_data, *TRACKING)  # the API refuses it too, before the data and the model
    with pytest.raises(ConfigError, match="needs the wandb package"):
        train.train(train_cfg, str(tmp_path / "api"), progress=False)
    assert not (tmp_path / "api" / "plan.json").exists()


def test_wandb_fields_are_checked_by_the_schema(demo_data, capsys):
    for override, pattern in (
            ("log.wandb.mode=onlin", r"^log.wandb.mode = 'onlin': unknown W&B mode; use online, offline or "
                                     r"disabled \(or '' for \$WANDB_MODE, else online\)$"),
            ("log.wandb.project=team/proj", r"^log.wandb.project = 'team/proj': not a W&B project name \(it "
                                            r"cannot contain /\)"),
            ("log.wandb.tags=('ok', '')", r"^log.wandb.tags.1 = '': a W&B tag has 1 to 64 characters"),
            ("log.wandb.tag=x", r"^log.wandb.tag = 'x': unknown field; did you mean 'tags'\?$")):
        with pytest.raises(ConfigError, match=pattern):
            smoke_config(demo_data, override)
    rc = cli.main(["train", str(SMOKE), "--workdir", "/nonexistent/w", "log.wandb.mode=bogus"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        "clt: error: log.wandb.mode = 'bogus': unknown W&B mode; use online, offline or disabled (or '' for "
        "$WANDB_MODE, else online)"]
    one = smoke_config(demo_data, "log.wandb.tags=baseline", "log.wandb.group=g")
    assert one.log.wandb.tags == ("baseline",)
    assert not one.log.wandb.enabled  # a group and tags (a sweep sets them) without a project: W&B off
    assert not smoke_config(demo_data, "log.wandb.project=p", "log.wandb.mode=disabled").log.wandb.enabled


def test_only_process_0_opens_wandb(wandb_env, demo_data, tmp_path):
    cfg = smoke_config(demo_data, *TRACKING)
    run = train.Run(cfg, tmp_path)
    run.is_main = False  # what every process other than 0 has
    run.open_run_files({})
    assert run.wandb is None and run.sinks == [] and not (tmp_path / "wandb").exists()
