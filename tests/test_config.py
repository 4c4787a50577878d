"""Config loading, the override grammar, and every validation error (one line naming the field and the fix)."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

from clt import config
from clt.config import ConfigError


def base(**top):
    raw = dict(data=dict(domains={"prose": "d/prose", "code": "d/code"}, seq_len=16), batch_size=4,
               phases=(dict(name="base", steps=100, mixture={"prose": 1.0}, schedule=dict(kind="cosine", peak=1e-3)),
                       dict(name="shift", steps=50, mixture={"code": 3, "prose": 1}, replay=0.25,
                            schedule="rewarm_cosine")))
    raw.update(top)
    return raw


def with_phase(i, **fields):
    raw = base()
    phases = list(raw["phases"])
    phases[i] = {**phases[i], **fields}
    raw["phases"] = tuple(phases)
    return raw


def error(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from clt import plan
        plan.resolve(config.from_dict(raw))


def test_valid_config_normalises_weights_and_resolves_presets():
    cfg = config.from_dict(base())
    assert dict(cfg.phases[1].mixture) == {"code": 0.75, "prose": 0.25}
    assert cfg.phases[1].schedule.kind == "cosine" and cfg.phases[1].schedule.warmup == 0.01
    assert cfg.phases[1].replay.share == 0.25


def test_unknown_field_suggests_the_right_one():
    error(base(batchsize=8), r"batchsize.*unknown field.*did you mean 'batch_size'")
    error(with_phase(0, mixtrue={"prose": 1}), r"phases\.0\.mixtrue.*did you mean 'mixture'")


def test_negative_weight():
    error(with_phase(0, mixture={"prose": -1.0}), r"phases\.0\.mixture\.prose = -1\.0: weights cannot be negative")


def test_weights_sum_to_zero():
    error(with_phase(0, mixture={"prose": 0.0}), r"weights sum to 0; give at least one domain a positive weight")


def test_undeclared_domain():
    error(with_phase(0, mixture={"prosa": 1.0}), r"phases\.base\.mixture\.prosa.*not declared.*did you mean 'prose'")


def test_two_or_zero_durations():
    error(with_phase(0, tokens="1M"), r"exactly one of steps / tokens / percent, got 2")
    phases = list(base()["phases"])
    phases[0] = {k: v for k, v in phases[0].items() if k != "steps"}
    error(base(phases=tuple(phases)), r"exactly one of steps / tokens / percent, got 0")


def test_percent_needs_budget_and_cannot_exceed_100():
    p0 = {k: v for k, v in base()["phases"][0].items() if k != "steps"}
    p1 = {k: v for k, v in base()["phases"][1].items() if k != "steps"}
    error(base(phases=({**p0, "percent": 60}, {**p1, "percent": 40})), r"percent needs a budget")
    error(base(budget=dict(steps=1000), phases=({**p0, "percent": 70}, {**p1, "percent": 40})),
          r"percent durations exceed 100% of the budget")


def test_warmup_plus_decay_longer_than_phase():
    error(with_phase(0, schedule=dict(kind="wsd", warmup=30, decay=0.8, peak=1e-3)),
          r"phases\.base\.schedule\.decay.*warmup \(30\) \+ decay \(80\) steps exceed the phase \(100\)")
    error(with_phase(0, schedule=dict(kind="cosine", warmup=100, peak=1e-3)), r"warmup \(100 steps\) must be shorter")


def test_end_above_peak():
    error(with_phase(0, schedule=dict(kind="cosine", peak=1e-4, end=1e-3)), r"schedule\.end.*above the peak")


def test_unknown_schedule_kind_and_preset():
    error(with_phase(0, schedule=dict(kind="cosin", peak=1e-3)), r"schedule\.kind = 'cosin': unknown schedule kind")
    error(with_phase(0, schedule="rewarm_cosin"), r"unknown schedule preset; did you mean 'rewarm_cosine'")


def test_duplicate_phase_names():
    error(with_phase(1, name="base"), r"phases\.base\.name = 'base': duplicate phase name")


def test_replay_share_out_of_range_and_in_first_phase():
    error(with_phase(1, replay=1.0), r"replay\.share = 1\.0: replay share must be in \[0, 1\)")
    error(with_phase(0, replay=0.1), r"phases\.base\.replay.*first phase has no earlier data")


def test_wrong_types():
    error(base(batch_size="8"), r"batch_size = '8': expected an integer")
    error(with_phase(0, optimizer="forget"), r"optimizer = 'forget': unknown optimizer policy; use keep or reset")


# ----------------------------------------------------------------------------------------------------------
# Overrides.
# ----------------------------------------------------------------------------------------------------------
def test_overrides_by_name_index_and_literal():
    raw = config.apply_overrides(base(), ["batch_size=16", "phases.shift.replay=0.1", "phases.0.steps=500",
                                          "phases.base.schedule.peak=2e-3", "phases.shift.mixture.prose=0.5",
                                          "phases.shift.schedule.warmup=5"])
    cfg = config.from_dict(raw)
    assert cfg.batch_size == 16
    assert cfg.phases[0].steps == 500 and cfg.phases[0].schedule.peak == 2e-3
    assert cfg.phases[1].replay.share == 0.1
    assert dict(cfg.phases[1].mixture) == pytest.approx({"code": 3 / 3.5, "prose": 0.5 / 3.5})
    # A preset named by string still takes field overrides, the rest of the preset kept.
    assert cfg.phases[1].schedule.warmup == 5 and cfg.phases[1].schedule.end == 3e-5


def test_override_string_values_and_errors():
    raw = config.apply_overrides(base(), ["phases.base.schedule.kind=wsd", "model.preset=demo"])
    assert raw["phases"][0]["schedule"]["kind"] == "wsd" and raw["model"]["preset"] == "demo"
    with pytest.raises(ConfigError, match=r"no phase 'shfit'.*\['base', 'shift'\]"):
        config.apply_overrides(base(), ["phases.shfit.replay=0.1"])
    with pytest.raises(ConfigError, match=r"overridden twice"):
        config.apply_overrides(base(), ["batch_size=8", "batch_size=16"])
    with pytest.raises(ConfigError, match=r"an override is key=value"):
        config.apply_overrides(base(), ["batch_size"])


def test_parse_count():
    assert config.parse_count("20M", "x") == 20_000_000
    assert config.parse_count("1.5B", "x") == 1_500_000_000
    assert config.parse_count(5e6, "x") == 5_000_000
    with pytest.raises(ConfigError, match="not a count"):
        config.parse_count("lots", "x")


def test_cli_config_error_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "clt.cli", "plan", "show", str(ROOT / "configs" / "demo.py"), "batch_sise=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert re.search(r"clt: error: batch_sise = 3: unknown field; did you mean 'batch_size'", proc.stderr)
    assert "Traceback" not in proc.stderr


def test_init_from_needs_a_prefix_and_a_folder():
    for ok in ("", "ckpt:runs/a", "ckpt:runs/a@500", "hf:models/llama"):
        config.check_init_from(ok, "model.init_from")
    with pytest.raises(ConfigError, match=r"^model.init_from = 'runs/a': not a weights source.*; write ckpt:runs/a "):
        config.check_init_from("runs/a", "model.init_from")
    with pytest.raises(ConfigError, match=r"^--init-from = 'ckpt:': names no folder; write ckpt:DIR"):
        config.check_init_from("ckpt:", "--init-from")
    error(base(model=dict(init_from="runs/a")), r"^model.init_from = 'runs/a': not a weights source")


def test_empty_domains_are_reported_before_the_mixtures_that_name_them():
    error(base(data=dict(domains={})), r"^data.domains = \{\}: no domains declared; add data.domains=")
    assert config.did_you_mean("prose", []) == "none are declared yet"


def test_config_path_must_be_a_python_file(tmp_path):
    (tmp_path / "a.py").write_text("def get_config():\n    return {}\n")
    (tmp_path / "a.txt").write_text("def get_config():\n    return {}\n")
    with pytest.raises(ConfigError, match=r"^config = '.*': is a folder, not a config file; give one of the files "
                                          r"in it, e.g. .*a\.py$"):
        config.load(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^config = '.*a\.txt': is not a Python \(\.py\) file"):
        config.load(str(tmp_path / "a.txt"))
