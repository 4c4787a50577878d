"""Every command in README.md runs as written, in a scratch folder laid out like a clone, on small data.

Commands come from ```bash blocks and from `$ ` lines in other code blocks (whose next lines are the output
shown). A command must exit 0 (2 where the README shows a `clt: error:`) and print the first line shown. The
few that cannot run here are in SKIP, the few that run with a change in ADAPT, each with its reason, and KNOWN
tolerates (with a warning) the failures of bugs outside this test's files; any other command runs as written,
so a new README command is tested without anyone listing it.
"""

import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings

import pytest
from conftest import JAX_CACHE, smoke_overrides
from objstores import GCS_BUCKET

from clt import config, train

ROOT = pathlib.Path(__file__).resolve().parent.parent

SKIP = {
    "make demo": "sets up .venv and trains the demo for ~5 min; the commands it runs are tested one by one",
    "make test": "the whole suite (~8 min), which this test is part of",
    "clt train configs/demo.py --workdir runs/demo [overrides]":
        "the 5-minute demo training ([overrides] is a placeholder); runs/demo here is a smoke run",
    "clt prepare demo --out data/demo":
        "full size (13 MB, ~8 s); data/demo here is the same prepare_demo with max_bytes=150_000",
    "clt prepare text --domain web --tokenizer tokenizer.json --split paragraph --out data/web dump.txt":
        "needs the optional `tokenizers` package and a tokenizer.json",
    "pip install clt[data]": "installs packages; the test extra already has them",
    "huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir models/SmolLM2-135M":
        "needs the network; the clone's models/SmolLM2-135M is a tiny random Llama with a byte-level tokenizer",
    "clt launch slurm configs/demo.py --workdir runs/demo-slurm --nodes 2 --gpus-per-node 8 --partition gpu "
    "--time 24:00:00": "submits to a SLURM cluster; the same command with --dry-run runs here",
    "clt launch gke configs/demo.py batch_size=64 data.eval_batch=32 --workdir gs://my-bucket/clt/runs/demo "
    "--accelerator tpu-v5p-64 --image us-docker.pkg.dev/my-project/clt/clt:1":
        "submits to a GKE cluster; the same command with --dry-run runs here",
    "wandb sync runs/tracked/wandb/offline-run-*":
        "uploads to W&B (the network and an API key); tests/test_wandb.py reads the offline files it would send",
}

SMOKE_SIZE = ("model.preset=tiny data.seq_len=32 data.block_rows=64 data.eval_sequences=8 data.eval_batch=8 "
              "batch_size=8 phases.0.steps=4 phases.0.schedule.warmup=1 phases.1.steps=2 monitor.every=2 "
              "monitor.dense_every=2 monitor.dense_window=2 checkpoint.every=0 log.every=2")
ADAPT = {  # README command -> (what runs instead, with {cmd} the command as written; why)
    "clt ckpt info runs/demo --step 400": (
        "clt ckpt info runs/demo --step 12", "step 12 ends the smoke run's first phase, as 400 ends the demo's"),
    "clt train configs/next.py --workdir runs/b --init-from ckpt:runs/a replay_buffer.load=buffers/a "
    "phases.0.replay={'share': 0.1, 'source': 'buffer'}": (
        "{cmd} " + SMOKE_SIZE, "runs/a is a smoke run: next.py shrunk to its model and seq_len, and to 6 steps"),
    "clt train configs/hf_continue.py --workdir runs/smol-legal": (
        "{cmd} " + SMOKE_SIZE, "the clone's SmolLM2-135M is tiny: the plan shrunk to 6 steps of 32 tokens"),
    "clt prepare jsonl --domain web --workers 8 --out gs://my-bucket/clt/web dumps/*.jsonl.zst": (
        f"clt prepare jsonl --domain web --workers 8 --out gs://{GCS_BUCKET}/clt/web 'dumps/*.jsonl.zst'",
        "the bucket of the GCS emulator the test runs"),
    "clt launch gke configs/demo.py batch_size=64 data.eval_batch=32 --workdir gs://my-bucket/clt/runs/demo "
    "--accelerator tpu-v5p-64 --image us-docker.pkg.dev/my-project/clt/clt:1 --dry-run": (
        f"clt launch gke configs/demo.py batch_size=64 data.eval_batch=32 --workdir gs://{GCS_BUCKET}/clt/runs/demo "
        "--accelerator tpu-v5p-64 --image us-docker.pkg.dev/my-project/clt/clt:1 --dry-run",
        "the bucket of the GCS emulator the test runs"),
    ".venv/bin/pytest tests/test_plan_mixture.py -q": (
        "{cmd} --collect-only", "the suite runs that file itself; collecting it checks the path"),
    ".venv/bin/python benchmarks/step.py --preset demo": (
        "{cmd} --help", "a timing benchmark (minutes); --help checks the interpreter, the script and its imports"),
}

KNOWN: dict[str, str] = {}  # README command -> a bug outside this test's files that makes it fail (tolerated)


@dataclasses.dataclass
class Command:
    text: str  # as written, continuation lines joined
    line: int  # in README.md
    shown: list[str]  # the output the README shows under a `$ ` line

    @property
    def key(self) -> str:
        """The command without comments or layout: how SKIP and ADAPT name it."""
        return " ".join(shlex.split(self.text, comments=True))


def readme_commands(markdown: str) -> list[Command]:
    """Commands of ```bash blocks (one per line, `\\` continues it, `#` comments) and `$ ` lines of other
    un-typed or console blocks, with the lines under a `$ ` line up to the next one as its shown output."""
    lines, out, i = markdown.splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```\s*(\w*)\s*$", lines[i])
        i += 1
        if not fence:
            continue
        lang, start = fence.group(1), i
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        block, i = lines[start:i], i + 1
        if lang not in ("bash", "sh", "shell", "console", "text", ""):
            continue
        prompt = lang not in ("bash", "sh", "shell")  # only `$ ` lines are commands there
        j = 0
        while j < len(block):
            raw, n = block[j], start + j + 1
            j += 1
            if prompt:
                if not raw.startswith("$ "):
                    if out and out[-1].line >= start + 1:
                        out[-1].shown.append(raw)
                    continue
                raw = raw[2:]
            elif not raw.strip() or raw.lstrip().startswith("#"):
                continue
            while raw.rstrip().endswith("\\") and j < len(block):
                raw = raw.rstrip()[:-1] + " " + block[j].strip()
                j += 1
            out.append(Command(raw.strip(), n, []))
    return out


def test_readme_commands_parses_blocks_prompts_and_continuations():
    md = "\n".join([
        "text `clt not-a-command`", "```bash", "# a comment", "clt a x=1   # why", "", "clt b \\", "    y=2",
        "```", "```python", "clt c", "```", "```", "$ clt d", "out 1", "out 2", "$ clt e | head -3", "```",
        "```", "plain text, no prompt", "```"])
    got = readme_commands(md)
    assert [(c.key, c.line, c.shown) for c in got] == [
        ("clt a x=1", 4, []), ("clt b y=2", 6, []), ("clt d", 13, ["out 1", "out 2"]), ("clt e | head -3", 16, [])]


@pytest.fixture(scope="module")
def clone(demo_data, tmp_path_factory):
    """A folder like a clone after `clt prepare demo` and a (smoke-size) `clt train ... --workdir runs/demo`:
    configs, presets and tests linked, benchmarks copied (their results land beside them), .venv the running
    interpreter's, `clt` on PATH, small data, runs/demo trained with a replay buffer, and runs/a the same run
    under the name the README's replay example uses. Also the inputs the README's examples name."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("configs", "schedules", "replay", "tests"):
        (root / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "benchmarks", root / "benchmarks", ignore=shutil.ignore_patterns("results"))
    (root / ".venv").symlink_to(sys.prefix)
    (root / "bin").mkdir()
    clt = root / "bin" / "clt"
    clt.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m clt.cli "$@"\n')
    clt.chmod(0o755)
    (root / "docs").mkdir()
    for k in range(8):
        (root / "docs" / f"contract-{k}.txt").write_text(f"Clause {k}. The parties agree to term {k}.\n" * 20)
    (root / "data").mkdir()
    (root / "data" / "demo").symlink_to(demo_data)
    cfg = config.load(str(ROOT / "configs" / "smoke.py"), smoke_overrides(demo_data, "replay_buffer.capacity=64"))
    train.train(cfg, str(root / "runs" / "demo"), progress=False)
    (root / "runs" / "a").symlink_to("demo")
    tiny_llama(root / "models" / "SmolLM2-135M")
    corpora(root)
    return root


def corpora(root: pathlib.Path) -> None:
    """The corpora of the README's `clt prepare jsonl|parquet` examples, small: zstd JSONL dumps, Parquet files
    and a `datasets` save_to_disk folder."""
    import json

    import datasets
    import pyarrow
    import pyarrow.parquet
    import zstandard

    texts = [f"Article {i}. " + "Some sentence about topic %d. " % (i % 7) * (i % 9 + 1) for i in range(40)]
    (root / "dumps").mkdir()
    for k in range(2):
        lines = "".join(json.dumps({"text": t, "url": f"https://example.org/{i}"}) + "\n"
                        for i, t in enumerate(texts[k::2]))
        (root / "dumps" / f"crawl-{k}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (root / "wiki" / "data").mkdir(parents=True)
    for k in range(2):
        pyarrow.parquet.write_table(pyarrow.table({"id": list(range(20)), "text": texts[k * 20:(k + 1) * 20]}),
                                    root / "wiki" / "data" / f"train-{k:05d}-of-00002.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(root / "saved" / "news" / "train"))


def tiny_llama(folder: pathlib.Path) -> None:
    """A random Llama in the layout `huggingface-cli download` leaves (config.json, model.safetensors, tokenizer
    files), tied like SmolLM2, with a byte-level tokenizer (EOS 256) so the README's small texts tokenize."""
    import json

    import torch
    import transformers

    from clt.data.tokenizer import write_hf_tokenizer

    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=512, eos_token_id=256, bos_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    write_hf_tokenizer("byte", folder)
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 256


def run(cmd: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{cwd / 'bin'}{os.pathsep}{os.environ['PATH']}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run(["bash", "-c", "set -o pipefail\n" + cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_next_config_adds_unicode_to_the_demo_and_replays_the_old_domains():
    """configs/next.py (the README's next-month example) at its real size: it loads without data or checkpoints."""
    from clt import plan

    cfg = config.load(str(ROOT / "configs" / "next.py"), [])
    pl = plan.resolve(cfg)
    demo = config.load(str(ROOT / "configs" / "demo.py"), [])
    assert cfg.model.init_from == "ckpt:runs/demo" and cfg.model.preset == demo.model.preset
    assert cfg.data.seq_len == demo.data.seq_len  # a buffer exported by a demo-shaped run must fit
    assert set(pl.domains) == {"prose", "code", "unicode"}
    first = pl.phases[0]
    assert first.mixture[pl.domains.index("unicode")] == 1.0 and first.replay_share > 0
    assert {d for d, w in zip(pl.domains, first.replay_weights) if w > 0} == {"prose", "code"}


def _words(line: str) -> str:
    return " ".join(line.split())


def test_every_readme_command_runs(clone, gcs_store):
    commands = readme_commands((ROOT / "README.md").read_text())
    keys = {c.key for c in commands}
    assert len(commands) >= 10, "the README parser found too few commands"
    stale = (set(SKIP) | set(ADAPT) | set(KNOWN)) - keys
    assert not stale, f"SKIP/ADAPT/KNOWN name commands the README no longer has: {sorted(stale)}"

    failures = []
    for c in commands:
        if c.key in SKIP:
            continue
        cmd = ADAPT[c.key][0].format(cmd=shlex.join(shlex.split(c.text, comments=True))) if c.key in ADAPT else c.text
        t0 = time.monotonic()
        try:
            r = run(cmd, clone)
        except subprocess.TimeoutExpired:
            failures.append(f"README.md:{c.line}: `{cmd}` ran past 180 s: add it to SKIP or ADAPT with a reason")
            continue
        print(f"{time.monotonic() - t0:5.1f} s  {cmd}")
        output = r.stdout + r.stderr
        error_shown = bool(c.shown) and c.shown[0].startswith("clt: error:")  # an example of a refusal
        problem = None
        if r.returncode != (2 if error_shown else 0):
            problem = f"exited {r.returncode}"
        elif c.shown and _words(c.shown[0]) not in {_words(x) for x in output.splitlines()}:
            problem = f"does not print the README's {c.shown[0]!r}"
        if problem and c.key in KNOWN:
            warnings.warn(f"README.md:{c.line}: `{cmd}` {problem}: known bug: {KNOWN[c.key]}", stacklevel=1)
        elif problem:
            failures.append(f"README.md:{c.line}: `{cmd}` {problem}:\n{output[-1500:]}")
    assert not failures, "\n\n".join(failures)
