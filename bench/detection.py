#!/usr/bin/env python3
"""Detection benchmark of the speech-energy test: people vs bots, as a confusion matrix.

Runs ``media.detector.SpeechTest`` over the labelled corpus of ``bench/corpus.py`` (built
first if missing or stale), feeding each sample as the RTP receiver would: 20 ms frames with
their time relative to the greeting start, a random packet loss rate per call (uniform in
0..``--loss``, default 5 %), and a few frames delivered late (after the next one).

It prints, for one split (default ``heldout``: voices, texts and seeds the thresholds were not
tuned on; ``tuning``, ``dev``, ``dev2`` and ``dev3`` are where they were chosen, see
``bench/corpus.py``):

* the confusion matrix: rows are the truth (people, bots), columns the verdict (human, bot,
  unsure);
* bots caught = bots judged "bot"; people failed = people judged "bot" (the only verdict that
  hurts a person: "unsure" sends them to the CAPTCHA or to voicemail, reported separately),
  each with a 95 % Wilson interval, since a few hundred samples cannot show 99 % to a decimal;
* a per-class breakdown; the bots by how much they really say over the greeting (from the
  corpus, before noise): a bot whose whole message is two hello-sized sentences looks like a
  person saying "hello? ... hello?" to an energy test, and ends "unsure" (CAPTCHA);
* the samples that went wrong, with the features behind the verdict;
* the detector's cost per 20 ms frame.

    .venv/bin/python bench/detection.py [--split heldout|tuning+dev+dev2+dev3|all] [--loss 0.05]
        [--late 0.01] [--json] [--dump FILE] [--set energy_margin_db=6 --set bot_talk_ms=800 ...]
        [--corpus DIR]

Protocol, so that the held-out number means something: change ``DetectorConfig`` only while
looking at ``--split tuning+dev+dev2+dev3``; run the default (held-out) split once per change
of the detector and report what it says. Once a held-out split has been looked at and the
detector changed because of it, it becomes a tuning split and a fresh one is made (that is how
``dev``, ``dev2`` and ``dev3`` came to be).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import corpus  # noqa: E402
from media import audio  # noqa: E402
from media.detector import DetectorConfig, SpeechTest  # noqa: E402

KINDS = ("human", "bot", "unsure")
GOAL_CAUGHT = 0.99
GOAL_FAILED = 0.01
BOT_TALK_BUCKETS = ((0.0, 2500.0), (2500.0, 4000.0), (4000.0, math.inf))


def simulate(pcm: np.ndarray, win: corpus.Window, config: DetectorConfig, *, loss: float,
             late: float, seed: int) -> tuple[str, float, dict[str, float], int]:
    """Feed one sample to a fresh ``SpeechTest`` the way RTP would deliver it."""
    rng = np.random.default_rng(seed)
    test = SpeechTest(win.greeting_ms, win.beep_ms, win.listen_after_ms, config)
    rate = float(rng.uniform(0, loss)) if loss > 0 else 0.0
    arrivals = [(i * 20.0, f) for i, f in enumerate(audio.frames(pcm))
                if not rng.random() < rate]
    k = 0
    while k < len(arrivals) - 1:  # a late frame arrives after its successor
        if rng.random() < late:
            arrivals[k], arrivals[k + 1] = arrivals[k + 1], arrivals[k]
            k += 1
        k += 1
    for t, frame in arrivals:
        test.add_frame(t, frame)
    v = test.result()
    return v.kind.value, v.confidence, v.features, len(arrivals)


def _run_one(job: tuple[dict[str, Any], str, dict[str, Any], float, float, int]
             ) -> dict[str, Any]:
    entry, root, cfg, loss, late, seed = job
    win_d = cfg.pop("__window__")
    win = corpus.Window(**win_d)
    pcm = audio.load_pcm(Path(root) / entry["file"])
    t0 = time.process_time()
    kind, conf, feats, n = simulate(pcm, win, DetectorConfig(**cfg), loss=loss, late=late,
                                    seed=seed + entry["seed"])
    cpu = time.process_time() - t0
    return {"id": entry["id"], "split": entry["split"], "truth": entry["truth"],
            "cls": entry["cls"], "expected": entry["expected"],
            "description": entry["description"], "verdict": kind, "confidence": conf,
            "speech_in_greeting_ms": entry.get("speech_in_greeting_ms", -1.0),
            "features": feats, "frames": n, "cpu_s": cpu}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    matrix = {t: Counter(r["verdict"] for r in rows if r["truth"] == t) for t in ("people", "bots")}
    n_people = sum(matrix["people"].values())
    n_bots = sum(matrix["bots"].values())
    caught = matrix["bots"]["bot"]
    failed = matrix["people"]["bot"]
    per_class: dict[str, dict[str, Any]] = {}
    by_cls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cls[r["cls"]].append(r)
    for cls in corpus.PEOPLE + corpus.BOTS:
        rs = by_cls.get(cls, [])
        c = Counter(r["verdict"] for r in rs)
        per_class[cls] = {"n": len(rs), "expected": corpus.EXPECTED.get(cls, "bot"),
                          **{k: c[k] for k in KINDS}}
    # bots by how much they actually say over the greeting (ground truth from the corpus):
    # the energy test cannot tell two hello-sized sentences from a person's "hello? hello?"
    by_talk: dict[str, dict[str, int]] = {}
    for lo, hi in BOT_TALK_BUCKETS:
        rs = [r for r in rows if r["truth"] == "bots" and lo <= r["speech_in_greeting_ms"] < hi]
        c = Counter(r["verdict"] for r in rs)
        by_talk[f"{lo / 1000:g}-{hi / 1000:g} s" if hi < math.inf else f">= {lo / 1000:g} s"] = {
            "n": len(rs), **{k: c[k] for k in KINDS}}
    frames = sum(r["frames"] for r in rows)
    cpu = sum(r["cpu_s"] for r in rows)
    return {
        "samples": len(rows),
        "matrix": {t: {k: matrix[t][k] for k in KINDS} for t in matrix},
        "bots": n_bots, "people": n_people,
        "bots_caught": caught / n_bots if n_bots else None,
        "bots_caught_ci95": wilson(caught, n_bots),
        "people_failed": failed / n_people if n_people else None,
        "people_failed_ci95": wilson(failed, n_people),
        "people_unsure": matrix["people"]["unsure"] / n_people if n_people else None,
        "people_human": matrix["people"]["human"] / n_people if n_people else None,
        "bots_unsure": matrix["bots"]["unsure"] / n_bots if n_bots else None,
        "bots_human": matrix["bots"]["human"] / n_bots if n_bots else None,
        "goal_met": (n_bots > 0 and caught / n_bots >= GOAL_CAUGHT
                     and n_people > 0 and failed / n_people <= GOAL_FAILED),
        "per_class": per_class,
        "bots_by_speech_in_greeting": by_talk,
        "us_per_frame": 1e6 * cpu / frames if frames else None,
    }


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def report(s: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace,
           meta: dict[str, Any]) -> str:
    out = []
    out.append(f"speech-energy test on {s['samples']} samples (split {args.split}, "
               f"packet loss 0-{100 * args.loss:.0f}% per call, {100 * args.late:.0f}% of frames "
               f"late, codec {meta['codec']})")
    w = meta["window"]
    out.append(f"window: greeting {w['greeting_ms']} ms, beep {w['beep_ms']} ms, "
               f"listen after {w['listen_after_ms']} ms")
    if meta["overrides"]:
        out.append(f"config overrides: {meta['overrides']}")
    out.append("")
    corner = "truth \\ verdict"
    out.append(f"{corner:<16}{'human':>8}{'bot':>8}{'unsure':>8}{'total':>8}")
    for t in ("people", "bots"):
        m = s["matrix"][t]
        out.append(f"{t:<16}{m['human']:>8}{m['bot']:>8}{m['unsure']:>8}{sum(m.values()):>8}")
    out.append("")
    lo, hi = s["bots_caught_ci95"]
    out.append(f"bots caught    {_pct(s['bots_caught'])}  (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"
               f"  goal >= {100 * GOAL_CAUGHT:.0f}%   judged human {_pct(s['bots_human'])}, "
               f"unsure {_pct(s['bots_unsure'])}")
    lo, hi = s["people_failed_ci95"]
    out.append(f"people failed  {_pct(s['people_failed'])}  (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"
               f"  goal <= {100 * GOAL_FAILED:.0f}%    judged human {_pct(s['people_human'])}, "
               f"unsure (-> CAPTCHA/voicemail) {_pct(s['people_unsure'])}")
    out.append(f"goal {'MET' if s['goal_met'] else 'NOT MET'} on this split")
    out.append("")
    out.append(f"{'class':<18}{'n':>4}{'human':>7}{'bot':>6}{'unsure':>8}  expected")
    for cls, c in s["per_class"].items():
        if c["n"]:
            out.append(f"{cls:<18}{c['n']:>4}{c['human']:>7}{c['bot']:>6}{c['unsure']:>8}"
                       f"  {c['expected']}")
    out.append("")
    out.append(f"{'bots by speech over the greeting':<34}{'n':>4}{'bot':>6}{'unsure':>8}"
               f"{'human':>7}")
    for bucket, c in s["bots_by_speech_in_greeting"].items():
        out.append(f"{bucket:<34}{c['n']:>4}{c['bot']:>6}{c['unsure']:>8}{c['human']:>7}")
    wrong = [r for r in rows if r["verdict"] != r["expected"]
             and not (r["truth"] == "people" and r["verdict"] != "bot"
                      and r["expected"] == "unsure")]
    if wrong:
        out.append("")
        out.append("not as expected (people: anything but the expected verdict except "
                   "human-for-unsure; bots: anything but bot):")
        keys = ("onset_ms", "hello_ms", "talk_ms", "talkover_ms", "longest_greeting_speech_ms",
                "response_ms", "greeting_coverage", "noise_floor_dbfs")
        for r in wrong[: args.show]:
            f = r["features"]
            fs = " ".join(f"{k.removesuffix('_ms')}={f[k]:g}" for k in keys)
            out.append(f"  {r['id']:<28} {r['verdict']:<6} ({r['confidence']:.2f}) "
                       f"{r['description']}\n      {fs}")
        if len(wrong) > args.show:
            out.append(f"  ... {len(wrong) - args.show} more (--show N)")
    if s["us_per_frame"] is not None:
        out.append("")
        out.append(f"detector cost: {s['us_per_frame']:.1f} us CPU per 20 ms frame "
                   f"(VAD, energy, bookkeeping; result() included)")
    return "\n".join(out)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(DetectorConfig)}
    defaults = DetectorConfig()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(fields)}")
        out[key] = type(getattr(defaults, key))(value)
    DetectorConfig(**out)  # validate
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_OUT)
    ap.add_argument("--split", default="heldout",
                    help="heldout (default), tuning, dev, dev2, dev3, all, or several joined by "
                    "'+'")
    ap.add_argument("--loss", type=float, default=0.05,
                    help="max packet loss rate; each call draws its rate in [0, LOSS]")
    ap.add_argument("--late", type=float, default=0.01, help="fraction of frames delivered late")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a DetectorConfig field (tuning)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--show", type=int, default=15, help="misjudged samples to list")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--dump", type=Path, help="write every sample's verdict and features "
                    "(JSON lines) to this file")
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        names = {sp.name for sp in corpus.SPLITS}
        if args.split != "all" and not set(args.split.split("+")) <= names:
            raise ValueError(f"--split {args.split!r}: use {', '.join(sorted(names))}, all "
                             "or several joined by '+'")
        if not 0 <= args.loss < 1 or not 0 <= args.late < 1:
            raise ValueError("--loss and --late must be within [0, 1)")
        manifest = corpus.build(args.corpus, quiet=args.json)
    except (ValueError, audio.AudioToolError, OSError) as exc:
        print(f"detection: {exc}", file=sys.stderr)
        return 1
    win, entries = corpus.load(manifest)
    doc = json.loads(manifest.read_text())
    if args.split != "all":
        entries = [e for e in entries if e["split"] in args.split.split("+")]
    cfg = dataclasses.asdict(DetectorConfig(**overrides))
    jobs = [(e, str(args.corpus), {**cfg, "__window__": dataclasses.asdict(win)}, args.loss,
             args.late, args.seed) for e in entries]
    if args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            rows = list(pool.map(_run_one, jobs, chunksize=8))
    else:
        rows = [_run_one(j) for j in jobs]
    s = summarize(rows)
    if args.dump:
        args.dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"window": doc["window"], "codec": doc["codec"], "overrides": overrides}
    if args.json:
        print(json.dumps({**s, "split": args.split, "loss": args.loss, "late": args.late,
                          "config": cfg, **meta,
                          "misjudged": [r for r in rows if r["verdict"] != r["expected"]
                                        and not (r["truth"] == "people" and r["verdict"] != "bot"
                                                 and r["expected"] == "unsure")]},
                         indent=1, default=float))
    else:
        print(report(s, rows, args, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
