"""REPRODUCTIONS.md from the paper sweeps of configs/papers/: run them, report them, stitch the reports together.

    clt prepare demo --out data/demo
    .venv/bin/python benchmarks/reproductions.py              # run what is not finished, then write everything
    .venv/bin/python benchmarks/reproductions.py --no-run     # only report the runs already in runs/papers/
    .venv/bin/python benchmarks/reproductions.py --paper gupta  # one paper's sweeps (and its section)

For every sweep of every paper (SECTIONS): `clt sweep configs/papers/<sweep>.py --workdir runs/papers/<sweep>`
(finished runs are skipped, so a rerun only trains what is missing), then `clt sweep report runs/papers/<sweep>
--out docs/reproductions/<sweep>` (its function, in this process: results.md, results.csv, runs.csv, plots:
committed). REPRODUCTIONS.md is then written from those folders (and each sweep's in-loop time, read from its
runs' `finished` events): per paper its claim, the commands, each sweep's generated table and plots, and verdicts
that this script computes from the generated results.csv (a comparison and its numbers).
Nothing in REPRODUCTIONS.md is typed by hand but the prose of SECTIONS (claims, what was scaled down).
Guo et al.'s two subsets of each new domain (a spread-out one, and a high-quality one ranked by domain relevance
under byte n-gram models) are prepared here too, into data/demo_guo/ (prepare_guo_subsets).

`--size N` passes the sweeps' size knob size=N (N times every plan's steps and eval intervals: the sweeps' c.scaled
keys), for a larger machine. `--steps N` instead sets budget.steps=N alone (each plan's lengths are fractions of
its budget) and `--first` runs only the first point of each sweep: the test suite runs `--steps 12 --first` into a
temporary folder (tests/test_papers.py). `--workdir`, `--docs` and `--out` move the three outputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
Results = dict[str, dict[str, float]]  # grid point -> metric -> mean (from results.csv)


# ----------------------------------------------------------------------------------------------------------
# Verdicts: simple comparisons of generated numbers, each a line of text with the numbers it compares.
# ----------------------------------------------------------------------------------------------------------
def yes(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


def f3(x: float) -> str:
    return f"{x:.3f}"


def get(res: Results, point: str, metric: str) -> float | None:
    return res.get(point, {}).get(metric)


def monotone(xs: list[float], increasing: bool) -> bool:
    return all((b >= a) if increasing else (b <= a) for a, b in zip(xs, xs[1:]))


def mix_loss(row: dict[str, float], mix: dict[str, float]) -> float | None:
    """The loss on the training mix: the mix-weighted mean of the final per-domain losses."""
    if not all(f"final/{d}" in row for d in mix):
        return None
    return sum(w * row[f"final/{d}"] for d, w in mix.items())


def v_shift(res: dict[str, Results]) -> list[str]:
    r = res["shift_strength"]
    out, strength = [], {}
    for pair in ("weak", "strong"):
        p = f"shift={pair}"
        row = r.get(p, {})
        need = ("end/base/old", "end/base/new", "final/new", "forgetting/shift/old")
        if any(k not in row for k in need):
            continue
        strength[pair] = row["end/base/new"] - row["final/new"]
        out.append(f"- {pair} shift: the model trained on the old domain has loss {f3(row['end/base/old'])} on it "
                   f"and {f3(row['end/base/new'])} on the new domain; after the shift phase the new domain is at "
                   f"{f3(row['final/new'])}: shift strength (what the old-domain model leaves to learn on the new "
                   f"one) **{strength[pair]:.3f}** nats/token; the old domain's loss then moves by "
                   f"{row['forgetting/shift/old']:+.3f} (forgetting, no replay).")
    if len(strength) == 2:
        out.append(f"- prose -> unicode is a stronger shift than prose -> code: "
                   f"{yes(strength['strong'] > strength['weak'])} ({strength['strong']:.3f} vs "
                   f"{strength['weak']:.3f} nats/token).")
    return out


MIX = {"prose": 0.6, "code": 0.3, "unicode": 0.1}  # configs/papers/pretrain.py's mix (the verdicts' weights)


def v_hagele(res: dict[str, Results]) -> list[str]:
    r = res["hagele_wsd"]
    loss = {p.split("=")[1]: mix_loss(row, MIX) for p, row in r.items()}
    loss = {k: v for k, v in loss.items() if v is not None}
    if "cosine" not in loss:
        return []
    wsd = {k: v for k, v in loss.items() if k.startswith("wsd")}
    out = [f"- loss on the training mix (0.6 prose + 0.3 code + 0.1 unicode, final): cosine {f3(loss['cosine'])}; "
           + ", ".join(f"{k} {f3(v)}" for k, v in wsd.items()) + "."]
    if "wsd20" in wsd:
        out.append(f"- WSD with a 20% 1-sqrt cooldown matches or beats cosine at equal steps: "
                   f"{yes(wsd['wsd20'] <= loss['cosine'] + 0.005)} ({wsd['wsd20'] - loss['cosine']:+.3f}; within "
                   f"0.005 counts as a match).")
    order = [k for k in ("wsd5", "wsd10", "wsd20", "wsd30") if k in wsd]
    if len(order) == 4:
        gains = [wsd[a] - wsd[b] for a, b in zip(order, order[1:])]  # > 0: the longer cooldown is better
        best = min(wsd, key=wsd.get)
        out.append(f"- gain of each longer cooldown (positive = lower loss): 5->10% {gains[0]:+.3f}, 10->20% "
                   f"{gains[1]:+.3f}, 20->30% {gains[2]:+.3f}; the best cooldown is {best}.")
        out.append(f"- a longer cooldown helps up to 20% (both 5->10% and 10->20% gain): "
                   f"{yes(gains[0] > 0 and gains[1] > 0)}; past 20% the gain is flat (|20->30%| < 0.01) or "
                   f"negative: {yes(gains[2] < 0.01)}.")
    return out


def v_blakeney(res: dict[str, Results]) -> list[str]:
    r = res["blakeney_upsample"]
    base = r.get("upsample=none")
    if not base:
        return []
    out = []
    rows = {p.split("=")[1]: row for p, row in r.items() if p != "upsample=none" and "final/code" in row}
    for k, row in rows.items():
        out.append(f"- {k}: code (target) {row['final/code'] - base['final/code']:+.3f}, prose (general) "
                   f"{row['final/prose'] - base['final/prose']:+.3f}, unicode "
                   f"{row['final/unicode'] - base['final/unicode']:+.3f}, training-mix loss "
                   f"{mix_loss(row, MIX) - mix_loss(base, MIX):+.3f} against the base mix.")
    if rows:
        gain_code = all(row["final/code"] < base["final/code"] for row in rows.values())
        out.append(f"- every window improves the target domain: {yes(gain_code)}.")
        best = min(rows, key=lambda k: mix_loss(rows[k], MIX))
        # the paper's trade-off: target gain per unit of general loss
        ratio = {k: (base["final/code"] - row["final/code"]) / max(row["final/prose"] - base["final/prose"], 1e-3)
                 for k, row in rows.items()}
        best_ratio = max(ratio, key=ratio.get)
        out.append(f"- the best window by training-mix loss is {best}; by code gained per nat of prose lost it is "
                   f"{best_ratio} ({', '.join(f'{k} {v:.2f}' for k, v in ratio.items())}); in the paper's "
                   f"10-20% range: {yes(best in ('10pct', '20pct'))} / {yes(best_ratio in ('10pct', '20pct'))}.")
    return out


def v_gupta(res: dict[str, Results]) -> list[str]:
    out = []
    w = res.get("gupta_warmup", {})
    if w:
        gaps = {p.split("=")[1]: (row["gap/shift/old"], row["gap/shift/new"]) for p, row in w.items()
                if "gap/shift/old" in row and "gap/shift/new" in row}
        if not gaps:
            return out
        out.append("- the gap at the switch (largest rise over the loss at the switch, dense eval) per warmup: "
                   + "; ".join(f"{k}: old {f3(a)}, new {f3(b)}" for k, (a, b) in gaps.items())
                   + ".")
        out.append(f"- re-warming raises the old domain's loss first: {yes(all(a > 0 for a, _ in gaps.values()))}; "
                   f"and the new domain's: {yes(all(b > 0 for _, b in gaps.values()))}.")
        finals = [row["final/new"] for row in w.values() if "final/new" in row]
        if finals:
            span = max(finals) - min(finals)
            out.append(f"- the warmup length matters little (final new-domain loss within 0.05 over the warmups: "
                       f"{', '.join(f3(x) for x in finals)}): {yes(span < 0.05)} (span {span:.3f}).")
    p = res.get("gupta_peak", {})
    if p:
        pts = [k for k in p if "forgetting/shift/old" in p[k]]
        forget = [p[k].get("forgetting/shift/old") for k in pts]
        adapt = [p[k].get("adaptation/shift/new") for k in pts]
        if len(pts) > 1 and None not in adapt:
            out.append(f"- by peak ({', '.join(k.split('=')[1] for k in pts)}): forgetting of old "
                       f"{', '.join(f3(x) for x in forget)}; adaptation to new {', '.join(f3(x) for x in adapt)}.")
            out.append(f"- a higher peak forgets more by the end of the phase: {yes(monotone(forget, True))}; adapts "
                       f"more: {yes(monotone(adapt, True))}.")
            gaps = [p[k].get("gap/shift/old") for k in pts]
            if None not in gaps:
                out.append(f"- a higher peak raises the old domain's loss more right after the switch (gap "
                           f"{', '.join(f3(x) for x in gaps)}): {yes(monotone(gaps, True))}.")
    return out


def v_ibrahim(res: dict[str, Results]) -> list[str]:
    out = []
    r, s = res.get("ibrahim_replay", {}), res.get("ibrahim_scratch", {})
    for pair in ("weak", "strong"):
        pts = [p for p in r if p.startswith(f"shift={pair},")]
        if not pts or any("final/old" not in r[p] for p in pts):
            continue
        shares = [p.split("replay=")[1] for p in pts]
        old = [r[p]["final/old"] for p in pts]
        new = [r[p]["final/new"] for p in pts]
        out.append(f"- {pair} shift, replay {'/'.join(shares)}: old-domain loss {'/'.join(f3(x) for x in old)}, "
                   f"new {'/'.join(f3(x) for x in new)}.")
        out.append(f"  - more replay forgets less (old loss falls with the share): {yes(monotone(old, False))}; "
                   f"costs the new domain little (new loss at 25% replay {new[shares.index('0.25')] - new[0]:+.3f} "
                   f"against none): {yes(new[shares.index('0.25')] - new[0] < 0.1)}." if "0.25" in shares else "")
        union = s.get(f"shift={pair}")
        if union and "final/old" in union:
            mean_u = (union["final/old"] + union["final/new"]) / 2
            means = {sh: (o + n) / 2 for sh, o, n in zip(shares, old, new)}
            best = min(means, key=means.get)
            out.append(f"  - the union baseline (from scratch, equal compute): old {f3(union['final/old'])}, new "
                       f"{f3(union['final/new'])}, mean {f3(mean_u)}; the best continual run (replay {best}) has mean "
                       f"{f3(means[best])}: continual + replay within 0.05 of the baseline or better: "
                       f"{yes(means[best] <= mean_u + 0.05)}.")
    i = res.get("ibrahim_infinite", {})
    cos = next((row for p, row in i.items() if p.startswith("sched=cos")), None)
    inf = next((row for p, row in i.items() if p.startswith("sched=inf")), None)
    if cos and inf:
        tasks = {"t1": "prose", "t2": "code", "t3": "unicode"}
        pairs = [(t, d, cos.get(f"end/{t}/{d}"), inf.get(f"release/{t}/{d}")) for t, d in tasks.items()]
        pairs = [x for x in pairs if None not in x]
        if pairs:
            out.append("- each task's own domain at its end, re-warmed cosine vs infinite (annealed release): "
                       + "; ".join(f"{t} {d}: {f3(c)} vs {f3(v)}" for t, d, c, v in pairs) + ".")
            worst = max(v - c for _, _, c, v in pairs)
            out.append(f"- the infinite schedule does about as well (within 0.05 on every task): {yes(worst <= 0.05)} "
                       f"(largest excess {worst:+.3f}).")
        gaps = [(m, cos[m], inf.get(m)) for m in cos if m.startswith("gap/t") and inf.get(m) is not None]
        if gaps:
            out.append("- the gap at each switch, cosine vs infinite: "
                       + "; ".join(f"{m.removeprefix('gap/')}: {f3(c)} vs {f3(v)}" for m, c, v in gaps) + "; "
                       f"the infinite schedule's gaps are smaller on average: "
                       f"{yes(sum(v for _, _, v in gaps) < sum(c for _, c, _ in gaps))}.")
    return [line for line in out if line]


def v_guo(res: dict[str, Results]) -> list[str]:
    r, out, nan = res.get("guo_gap", {}), [], float("nan")
    for shift in ("weak", "strong"):
        base = r.get(f"shift={shift},data=full")
        if not base or "gap/shift/old" not in base:
            continue
        rec = base.get("recovery/shift/old")
        out.append(f"- {shift} shift, plain continual pre-training (the whole new domain, one pass): the new "
                   f"domain's loss falls from the first step (gap {f3(base.get('gap/shift/new', nan))}; a gap on "
                   f"the new domain: {yes(base.get('gap/shift/new', 0) > 0)}); the old domain's rises by "
                   f"{f3(base['gap/shift/old'])} and "
                   f"{'does not recover' if rec is None else f'recovers after {rec:.0f} steps'}.")
        for strategy in ("subset", "quality", "mix"):
            row = r.get(f"shift={shift},data={strategy}", {})
            if "final/new" not in row or "gap/shift/old" not in row:
                continue
            rec = row.get("recovery/shift/old")
            out.append(f"  - {strategy}: old-domain gap {f3(row['gap/shift/old'])} (full "
                       f"{f3(base['gap/shift/old'])}), "
                       f"{'no recovery' if rec is None else f'recovered after {rec:.0f} steps'}; final new "
                       f"{f3(row['final/new'])} (full {f3(base['final/new'])}), final old {f3(row['final/old'])} "
                       f"(full {f3(base['final/old'])}). Shallower gap: "
                       f"{yes(row['gap/shift/old'] < base['gap/shift/old'])}; better on the new domain: "
                       f"{yes(row['final/new'] < base['final/new'])}.")
        sub, top = r.get(f"shift={shift},data=subset", {}), r.get(f"shift={shift},data=quality", {})
        if all(k in row for row in (sub, top) for k in ("gap/shift/old", "final/new")):
            out.append(f"  - the relevant subset against the spread-out one (the same bytes and epochs): old-domain "
                       f"gap {f3(top['gap/shift/old'])} vs {f3(sub['gap/shift/old'])}, final new "
                       f"{f3(top['final/new'])} vs {f3(sub['final/new'])}. Shallower gap: "
                       f"{yes(top['gap/shift/old'] < sub['gap/shift/old'])}; better on the new domain: "
                       f"{yes(top['final/new'] < sub['final/new'])}.")
    return out


# ----------------------------------------------------------------------------------------------------------
# The sections: one per paper (the prose is written by hand; every number comes from the sweeps).
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Section:
    key: str
    title: str
    claim: str
    setup: str
    sweeps: tuple[str, ...]
    verdicts: Callable[[dict[str, Results]], list[str]]
    notes: str = ""
    extra: dict = field(default_factory=dict)


SECTIONS = (
    Section("shift", "Shift strength of the demo domain pairs (the yardstick)",
            "Not a paper: how far apart the domains of each pair are, which the other sections rely on. The shift "
            "strength is the loss of a model trained on the old domain alone, evaluated on the new one, minus the "
            "new domain's loss once the same model has trained on it for as long (the end of the shift phase). "
            "The plain difference of the two domains' losses would mislead: code is more predictable than prose "
            "(lower loss) even for a model that has seen only prose.",
            "configs/papers/continual.py: 200 steps on `old`, then 200 on `new` (re-warmed cosine, no replay), "
            "the `tiny` model (0.1M parameters, byte tokens), sequences of 64, batch 16.",
            ("shift_strength",), v_shift,
            notes="**At this scale.** The pair prose -> unicode is a strong shift and prose -> code a weak one, "
            "as the verdicts above measure. In the weak pair, training on code even lowers the prose loss after "
            "a short rise (the forgetting is negative): a 200-step model is still learning what the two domains "
            "share (English words, docstrings), so the weak shift shows the stability gap but not lasting "
            "forgetting. The strong pair forgets the old domain almost completely without replay."),
    Section("hagele", "Hägele et al. 2024 (and MiniCPM): WSD with a 1-sqrt cooldown against cosine",
            "At an equal budget, warmup-stable-decay with a short 1-sqrt cooldown matches cosine; longer cooldowns "
            "help, with gains plateauing near 20% of training.",
            "configs/papers/pretrain.py: one phase of 400 steps on prose .6 / code .3 / unicode .1; cosine to 10% "
            "of the peak against WSD (1-sqrt to 0) with a cooldown of 5, 10, 20, 30%. Scaled down from 124M-360M "
            "models and billions of tokens to the `tiny` model and 410K tokens.",
            ("hagele_wsd",), v_hagele,
            notes="**At this scale.** WSD matches or beats cosine (held). Where the paper finds gains up to a "
            "~20% cooldown, here the shortest cooldowns are the best and each longer one loses a little: a "
            "400-step run of a "
            "0.1M-parameter model is far from converged, so steps at the peak LR are worth more than a longer "
            "decay, and the optimal cooldown fraction is known to depend on the run's length and the model. Part "
            "of WSD's margin over cosine comes from decaying to 0 rather than to 10% of the peak, as in the "
            "paper's own comparison. The table's ± is the spread over three seeds."),
    Section("blakeney", "Blakeney et al. 2024, \"Does your data spark joy?\": domain upsampling at the end",
            "Upsampling a domain over the last part of training improves it at a small cost elsewhere; 10-20% of "
            "training is the best trade-off.",
            "configs/papers/pretrain.py (cosine): the base mix throughout against code upsampled to .7 (prose .25, "
            "unicode .05) over the last 5, 10, 20, 30% of the steps. Code is the target (the paper's math/code "
            "benchmarks), prose the general domain; eval loss stands in for benchmark accuracy.",
            ("blakeney_upsample",), v_blakeney,
            notes="**At this scale.** The direction held: every upsampling window lowers the target (code) loss "
            "and raises the general (prose) loss, and the target gain stops growing past the 20% window (the "
            "30% one gains less) while the general cost keeps growing. The sweet spot depends on the criterion: "
            "by code gained per unit of prose lost it lies in the paper's 10-20% range; by the loss on the "
            "training mix the "
            "shortest window is best, since the mix is mostly prose. Eval loss is a stand-in for the paper's "
            "benchmark accuracy, which can improve while the loss on the rest of the mix worsens."),
    Section("gupta", "Gupta et al. 2023: how to (re)warm your model",
            "Re-warming on new data first raises the loss on old and new data, then improves the new domain; the "
            "warmup length (0-2% of the phase) matters little; a higher re-warm peak forgets more and adapts more.",
            "configs/papers/continual.py on the weak shift (prose -> code; the paper's Pile -> SlimPajama is weak "
            "too), 200 + 200 steps, dense eval every 2 steps over the 40 after the switch. Warmup sweep at the "
            "pre-training peak 3e-3; peak sweep (3e-4 = no re-warm, 1e-3, 3e-3, 6e-3) at a 1% warmup.",
            ("gupta_warmup", "gupta_peak"), v_gupta,
            notes="**At this scale.** Held: the re-warm raises the old domain's loss first (a stability gap that "
            "then recovers), the warmup length barely matters, a higher peak adapts more to the new domain and "
            "causes a deeper initial rise on the old one. Not held: the new domain's loss does not rise at the "
            "switch, and a higher peak does not forget more by the end of the phase (the old domain ends lower "
            "than at the switch). Both come from the model being far from converged after 200 steps: any "
            "large-LR step on code still teaches it English-like structure it lacks, whereas the paper re-warms "
            "a Pythia model already trained on 300B tokens, for which a large LR first undoes fine structure."),
    Section("ibrahim", "Ibrahim et al. 2024: re-warm, re-decay and replay; infinite schedules",
            "Re-warming, re-decaying and replaying a little old data matches training from scratch on the union "
            "at equal compute; more replay forgets less and adapts slightly less, and a strong shift needs more "
            "(their Table 2, 405M, Pile -> German, replay 0/1/5/10/25/50%: Pile loss 3.56/2.83/2.57/2.46/2.33/2.24, "
            "German 1.11/1.12/1.12/1.13/1.16/1.22). An infinite schedule does about as well as re-warmed cosine "
            "over several tasks without re-warming.",
            "configs/papers/continual.py, weak and strong shift x replay 0, 1, 5, 25, 50% (rows of the shift "
            "phase's budget: equal compute); the union baseline trains 400 steps on 50/50 old/new from scratch. "
            "configs/papers/three_domains.py: prose -> code -> unicode, 200 steps each, re-warmed cosine per task "
            "against infinite cosine with a branch anneal over the last 10% of each task.",
            ("ibrahim_replay", "ibrahim_scratch", "ibrahim_infinite"), v_ibrahim,
            notes="**At this scale.** The replay trade-off held in the paper's shape: on the strong shift, no "
            "replay forgets the old domain almost entirely and even 1% replay removes most of that, more replay "
            "keeps lowering the old loss while the new loss rises slowly, as in their Table 2; the weak shift "
            "needs little replay and forgets little without it. Not held: the union baseline stays ahead of "
            "every continual run, by more on the strong shift. At 400 steps the model is undertrained, and the "
            "continual runs spend part of their budget decaying the LR at the end of the first phase and "
            "re-warming it, which the single-cosine union run does not; the paper's models had converged on "
            "their first dataset (300B tokens), where that cost is small against what the second phase adds. "
            "The infinite schedule did as well as re-warmed cosine on every task (better here, for the same "
            "reason as WSD against cosine: more steps at a high LR), and its gaps at the switches are smaller on "
            "average (the verdict above)."),
    Section("guo", "Guo et al. 2024: mitigating the stability gap",
            "At a switch the loss first rises (the stability gap) before it falls; training several epochs on a "
            "subset, on a high-quality subset, and on a mixture close to the pre-training data make the gap "
            "shallower and the recovery faster.",
            "configs/papers/continual.py on both shifts (weak: prose -> code; strong: prose -> unicode), 200 + 200 "
            "steps, dense eval every 2 steps over the 60 after the switch. The shift phase trains on the whole new "
            "domain (full: one pass, less than an epoch), on a spread-out 1/20 of its training documents (subset: "
            "2-3 epochs), on as many bytes of the documents most relevant to the new domain (quality: the lowest "
            "Moore-Lewis cross-entropy difference H_new - H_old under byte 4-gram models; the paper's final "
            "version describes its high-quality subset as chosen for domain relevance), or on 50% new + 50% prose "
            "(mix: closer to the pre-training data). The new domain's metric is always the whole domain's "
            "held-out split, whose documents neither subset holds. Three seeds.",
            ("guo_gap",), v_guo,
            notes="**At this scale.** The stability gap shows on the old domain's loss, not on the new one's: a "
            "0.1M-parameter model learns the new domain from the first steps, whereas the paper measures "
            "downstream medical accuracy, which needs the general abilities that the switch first disturbs. So "
            "the old domain's loss is the proxy, and the weak shift is the paper's case: there it rises and then "
            "recovers, while on the strong shift it only rises (forgetting, not a gap) unless old data comes "
            "back. Held, on both shifts: a mixture close to the pre-training data makes the gap far shallower "
            "and the recovery far faster, at a small cost on the new domain. Not held: several epochs on a "
            "subset, and a subset chosen for relevance, make the gap deeper on the weak shift and do not end "
            "better on the new domain. Why we think so: at this scale the gap is a matter of distribution "
            "distance, and both subsets move the model further from the old domain, a few documents repeated "
            "(the subset) or the documents least like the old domain (relevance ranking picks them by "
            "construction: H_new - H_old is lowest for them); the paper's subsets come from a corpus far larger "
            "than the budget and are judged by downstream medical tasks, a benefit a held-out loss over the "
            "whole domain does not measure. On the strong shift the relevance-ranked subset is the Yi, Vai and hieroglyph "
            "syllable tables, the regular documents least like prose, and it generalises worst to the rest of "
            "the table, although it forgets the old domain a little more slowly."),
)


# ----------------------------------------------------------------------------------------------------------
# Running, reporting, stitching.
# ----------------------------------------------------------------------------------------------------------
def clt(*args: str) -> int:
    """`clt ARGS...` in this process (a sweep's runs are still one `clt train` process each); its exit code."""
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the runs'
    from clt import cli

    return cli.main(list(args))


def sweep_report(workdir: pathlib.Path, out: pathlib.Path) -> None:
    """What `clt sweep report WORKDIR --out OUT` writes (the function it calls), without a process start."""
    sys.path.insert(0, str(ROOT))
    from clt import sweep

    print(sweep.write_sweep_report(workdir, out), flush=True)


def first_run(config: str) -> str:
    """The name of the first run of a sweep (for --first)."""
    sys.path.insert(0, str(ROOT))
    from clt import sweep

    return sweep.expand(sweep.load_sweep(config))[0].name


GUO_DATA = "data/demo_guo"  # configs/papers/guo_gap.py's subsets: GUO_DATA/<new domain>/{sub,top}
GUO_OLD = "prose"  # the old (pre-training) domain of both of its shifts
GUO_NEW = ("code", "unicode")  # the new domains: the weak and the strong shift
GUO_EVERY = 20  # the spread-out subset: every 20th training document of the new domain
NGRAM_ORDER = 4  # the relevance scorer's byte n-gram models (contexts of 3 bytes)


def prepared_documents(split: str) -> list[str]:
    """The documents of a prepared split (a domain's train/ or eval/ folder) as text, in order; only a byte-
    tokenized domain (as `clt prepare demo` makes by default) gives back its exact text."""
    sys.path.insert(0, str(ROOT))
    from clt.data.shards import Shard
    from clt.data.tokenizer import ByteTokenizer

    shard = Shard(split)
    if shard.tokenizer != ByteTokenizer.name:
        raise SystemExit(f"reproductions: {split} holds {shard.tokenizer} tokens; Guo's subsets need the demo "
                         f"domains prepared with the byte tokenizer: clt prepare demo --out data/demo")
    offsets = [int(x) for x in shard.doc_offsets]
    tokens = shard.read_tokens(0, offsets[-1])
    return [ByteTokenizer().decode(tokens[a:b]) for a, b in zip(offsets, offsets[1:])]


def _grams(docs: list[bytes], n: int):
    """Every (n+1)-byte window of every document (never across two) as one integer (its n-byte context: >> 8),
    and where its last byte lies in the documents laid end to end."""
    import numpy as np

    grams, where, start = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
    for b in docs:
        a = np.frombuffer(b, np.uint8).astype(np.int64)
        if len(a) > n:
            grams.append(sum(a[k:len(a) - n + k] << (8 * (n - k)) for k in range(n + 1)))
            where.append(np.arange(start + n, start + len(a)))
        start += len(a)
    return np.concatenate(grams), np.concatenate(where)


def ngram_model(docs: list[bytes], order: int = NGRAM_ORDER) -> list:
    """A byte n-gram language model of `docs`: per order, the sorted distinct grams with their counts and the
    sorted distinct contexts with their counts and numbers of distinct successors (what Witten-Bell needs)."""
    import numpy as np

    tables = []
    for n in range(order):
        g, gc = np.unique(_grams(docs, n)[0], return_counts=True)
        h, first = np.unique(g >> 8, return_index=True)
        tables.append((g, gc, h, np.add.reduceat(gc, first), np.diff(np.append(first, len(g)))))
    return tables


def nats_per_byte(model: list, docs: list[bytes]):
    """Each document's cross-entropy under the model, Witten-Bell interpolated from the longest context down to
    uniform bytes: P_n(c|h) = (C(hc) + T(h) P_(n-1)(c|h')) / (C(h) + T(h)) for a seen context h, else P_(n-1)."""
    import numpy as np

    sizes = np.array([len(b) for b in docs], np.int64)
    p = np.full(int(sizes.sum()), 1.0 / 256)
    for n, (g, gc, h, hc, ht) in enumerate(model):
        grams, where = _grams(docs, n)
        if not len(grams) or not len(g):
            continue
        at = np.minimum(np.searchsorted(h, grams >> 8), len(h) - 1)
        seen = h[at] == grams >> 8
        gat = np.minimum(np.searchsorted(g, grams), len(g) - 1)
        count = np.where(g[gat] == grams, gc[gat], 0)
        lower = p[where]
        p[where] = np.where(seen, (count + ht[at] * lower) / np.maximum(hc[at] + ht[at], 1), lower)
    owner = np.repeat(np.arange(len(docs)), sizes)
    return np.bincount(owner, weights=-np.log(p), minlength=len(docs)) / np.maximum(sizes, 1)


def relevance_scores(new: list[str], old: list[str], order: int = NGRAM_ORDER):
    """Moore-Lewis cross-entropy difference, per new-domain document: H_new(x) - H_old(x), in nats per byte
    (lower: more typical of the new domain and less of the old one). H_new comes from a byte n-gram model of the
    *other* half of the new documents (two folds: no document is scored by counts of itself), H_old from one of
    the old domain's training documents. Guo et al. rank their domain corpus by domain relevance; this is the
    classic language-model form of that ranking, with byte models small enough to fit in seconds."""
    import numpy as np

    data = [d.encode("utf-8") for d in new]
    old_model = ngram_model([d.encode("utf-8") for d in old], order)
    scores = np.zeros(len(data))
    for fold in (0, 1):
        model = ngram_model([b for i, b in enumerate(data) if i % 2 != fold], order)
        scored = data[fold::2]
        scores[fold::2] = nats_per_byte(model, scored) - nats_per_byte(old_model, scored)
    return scores


def guo_subsets(new: list[str], relevance) -> dict[str, list[str]]:
    """The two subsets of a new domain for configs/papers/guo_gap.py, of the same size in bytes, each in the
    domain's order: `sub`, every GUO_EVERY-th document (spread over the whole domain, not its first files or rows);
    `top`, the most relevant documents (`relevance`: relevance_scores, lowest first) until they hold as many bytes
    as `sub`."""
    import numpy as np

    sub = new[::GUO_EVERY]
    budget = sum(len(d.encode("utf-8")) for d in sub)
    chosen, size = [], 0
    for i in np.argsort(relevance, kind="stable"):
        if size >= budget:
            break
        chosen.append(int(i))
        size += len(new[i].encode("utf-8"))
    return {"sub": sub, "top": [new[i] for i in sorted(chosen)]}


def held_out_placeholder(name: str, docs: list[str], held_out: str) -> str:
    """A held-out document of the new domain, numbered so that its eval draw (for the domain NAME) is below
    every one of `docs`': prepared with eval_fraction 0, it alone moves to the eval split (clt prepare leaves no
    split empty), so a subset trains on all of its documents and is evaluated on text no run trains on."""
    sys.path.insert(0, str(ROOT))
    from clt.data import prepare

    lowest = min(prepare._eval_draw(name, d) for d in docs)
    number = 0
    while prepare._eval_draw(name, f"{held_out}{number}\n") >= lowest:
        number += 1
    return f"{held_out}{number}\n"


def prepare_guo_subsets(data: str = "data/demo", out: str = GUO_DATA) -> None:
    """Prepare OUT/<new>/{sub,top} (guo_subsets of each GUO_NEW domain's train split in DATA, ranked against
    GUO_OLD's) with the byte tokenizer, every document in the train split; a subset whose text is unchanged since
    its last prepare is kept."""
    sys.path.insert(0, str(ROOT))
    from clt.data import prepare

    old = prepared_documents(f"{data}/{GUO_OLD}/train")
    for domain in GUO_NEW:
        pool = prepared_documents(f"{data}/{domain}/train")
        held_out = prepared_documents(f"{data}/{domain}/eval")[0]  # the placeholder's text: no run trains on it
        for name, docs in guo_subsets(pool, relevance_scores(pool, old)).items():
            folder = pathlib.Path(out, domain)
            source = folder / f"{name}.jsonl"
            records = [*docs, held_out_placeholder(name, docs, held_out)]
            lines = "".join(json.dumps({"text": d}) + "\n" for d in records)
            if (folder / name / "prepare.json").is_file() and source.is_file() and source.read_text() == lines:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            source.write_text(lines)
            done = prepare.prepare("jsonl", [str(source)], domain=name, tokenizer="byte", out=str(folder / name),
                                   eval_fraction=0.0, progress=False)
            if (done["train"]["docs"], done["eval"]["docs"]) != (len(docs), 1):
                raise RuntimeError(f"{folder / name}: {done['train']['docs']} train and {done['eval']['docs']} "
                                   f"eval documents, expected {len(docs)} and 1 (has clt prepare's split changed?)")


def read_results(csv_path: pathlib.Path) -> Results:
    out: Results = {}
    if not csv_path.is_file():
        return out
    for row in csv.DictReader(csv_path.open()):
        out[row["point"]] = {k: float(v) for k, v in row.items() if "/" in k and not k.endswith(" std") and v}
    return out


def run_seconds(workdir: pathlib.Path) -> tuple[float, int]:
    """The summed in-loop time (train + compile + eval + checkpoint, from each run's `finished` event) and the
    number of finished runs; process starts (~5-10 s each on a 2-core CPU) are not in it."""
    total, n = 0.0, 0
    for events in sorted(workdir.glob("*/events.jsonl")):
        for line in events.read_text().splitlines():
            e = json.loads(line)
            if e.get("event") == "finished":
                total += sum(e.get("time", {}).values())
                n += 1
    return total, n


def sweep_block(name: str, docs: pathlib.Path, out_dir: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    """The generated part of one sweep: its results.md table and plots, with links relative to REPRODUCTIONS.md."""
    md = docs / name / "results.md"
    if not md.is_file():
        return [f"*`{name}` has not run yet: `python benchmarks/reproductions.py --paper ...`.*", ""]
    rel = os.path.relpath(docs / name, out_dir)
    lines = md.read_text().splitlines()[2:]  # without the report's own title
    lines = [re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)", lambda m: f"![{m.group(1)}]({rel}/{m.group(2)})", line)
             for line in lines]
    secs, n = run_seconds(workdir / name)
    timing = [f"In-loop time of its {n} finished runs: {secs:.0f} s (train + compile + eval + checkpoint, without "
              f"process starts)."] if n else []
    return [f"### `{name}`", "", f"`clt sweep configs/papers/{name}.py --workdir runs/papers/{name}` "
            f"([config](configs/papers/{name}.py), [results.csv]({rel}/results.csv))", "", *timing, "", *lines, ""]


def write_document(out: pathlib.Path, docs: pathlib.Path, workdir: pathlib.Path,
                   sections: tuple[Section, ...]) -> None:
    out_dir = out.parent
    md = ["# Reproductions", "",
          "Qualitative reproductions of continual pre-training papers at a scale that runs on a 2-core CPU, from "
          "the plans and sweeps in [`configs/papers/`](configs/papers). **Generated** by "
          "`benchmarks/reproductions.py` (`make reproductions`) from the sweeps' `clt sweep report` output in "
          "[`docs/reproductions/`](docs/reproductions): edit that script, not this file. Every table and plot is "
          "a sweep report; every verdict is a comparison the script computes from the reports' results.csv.", "",
          "Common scale: the `tiny` model (d_model 64, 2 layers, 0.1M parameters, byte tokens), sequences of 64, "
          "batch 16, a few hundred steps per phase, the demo data (`clt prepare demo --out data/demo`). Three seeds "
          "per point where differences are small (`hagele_wsd`, `blakeney_upsample`, `gupta_*`, `guo_gap`: the "
          "tables give mean ± sample std), one elsewhere (give any sweep `c.seeds = (0, 1, 2)` for a spread: at "
          "this size, differences of a few hundredths of a nat can be seed noise). **Size:** every plan's lengths "
          "are fractions of `budget.steps`, and every sweep takes `size=N` after its config on the command line "
          "(`clt sweep configs/papers/guo_gap.py --workdir DIR size=10`, or `benchmarks/reproductions.py --size "
          "10`): N times the steps and the eval intervals (`budget.steps`, `monitor.every`, "
          "`monitor.dense_every`, `monitor.dense_window`, `log.every`: each sweep's `c.scaled`), so the dense "
          "window still covers the same share of a phase. On a larger machine add a larger model and more data "
          "per step too, e.g. `model.preset=demo data.seq_len=256 batch_size=64`.", ""]
    for s in sections:
        res = {name: read_results(docs / name / "results.csv") for name in s.sweeps}
        md += [f"## {s.title}", "", f"**Claim.** {s.claim}", "", f"**Setup.** {s.setup}", ""]
        verdicts = s.verdicts(res) if any(res.values()) else []
        md += ["**Verdicts (computed).**", "", *(verdicts or ["- not run yet."]), ""]
        if s.notes:
            md += [s.notes, ""]
        for name in s.sweeps:
            md += sweep_block(name, docs, out_dir, workdir)
    out.write_text("\n".join(md).rstrip() + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", action="append", choices=[s.key for s in SECTIONS],
                    help="only these papers' sweeps run (the document still has every section)")
    ap.add_argument("--no-run", action="store_true", help="only report and stitch what has run")
    ap.add_argument("--size", type=int, help="the sweeps' size=N: N times every plan's steps and eval intervals")
    ap.add_argument("--steps", type=int, help="budget.steps of every run, alone (a smoke size; default: the plan's)")
    ap.add_argument("--first", action="store_true", help="only the first point of each sweep (smoke)")
    ap.add_argument("--workdir", default="runs/papers")
    ap.add_argument("--docs", default="docs/reproductions")
    ap.add_argument("--out", default="REPRODUCTIONS.md")
    ap.add_argument("--configs", default="configs/papers", help="where the sweep configs are")
    args = ap.parse_args(argv)
    workdir, docs, out = pathlib.Path(args.workdir), pathlib.Path(args.docs), pathlib.Path(args.out)
    chosen = [s for s in SECTIONS if not args.paper or s.key in args.paper]
    failed = []
    for s in chosen:
        for name in s.sweeps:
            config = f"{args.configs}/{name}.py"
            if not args.no_run:
                if name == "guo_gap":
                    prepare_guo_subsets()
                extra = [f"size={args.size}"] if args.size else []
                extra += [f"budget.steps={args.steps}"] if args.steps else []
                extra += ["--only", first_run(config)] if args.first else []
                t0 = time.time()
                rc = clt("sweep", config, "--workdir", str(workdir / name), "--quiet", *extra)
                print(f"reproductions: {name}: exit {rc}, {time.time() - t0:.0f} s", flush=True)
                if rc:
                    failed.append(name)
            if (workdir / name / "sweep.json").is_file():  # `clt sweep report DIR --out DOCS/<sweep>`, in-process
                sweep_report(workdir / name, docs / name)
    write_document(out, docs, workdir, SECTIONS)
    print(f"reproductions: wrote {out}" + (f"; failed sweeps: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
