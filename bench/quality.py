"""The quality table: each method against its baselines over seeds, every claim gated on its
precondition, with a Welch confidence interval for the difference of means.

A claim reads "A beats B on metric M on task T" and carries a precondition: what must be true
of task T for the claim to be testable there at all (e.g. GZSL: the baseline's ZSL accuracy is
clearly above chance, U > 0.1 and S > 0.1; SSL: the SimCLR probe beats the raw-pixel probe). Verdicts:

    not testable here   the precondition failed (or was not measured): nothing is concluded
    held                the 95% Welch interval of mean(A) - mean(B) lies above 0
    not held            it lies below 0 (B is better)
    inconclusive        it contains 0

It reads the per-method benchmark results (bench/results/<method>.json, written by
bench/<method>.py) and writes bench/results/quality.json, which `methodlab report` renders
first. Numbers are whatever was measured.

    .venv/bin/python bench/quality.py
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, Figure, tuned_by, write_results  # noqa: E402

CONFIDENCE = 0.95
VERDICTS = ("held", "not held", "inconclusive", "not testable here")


NOT_SWEPT = tuned_by(None)


def row(method: str, variant: str, metric: str, values: list[float], task: str = "",
        tuned: str = NOT_SWEPT) -> dict:
    """`tuned`: how the variant's hyperparameters were chosen (`common.tuned_by`: the
    bench/tune.py sweep that chose them, by name)."""
    return {"method": method, "variant": variant, "metric": metric, "task": task, "n": len(values),
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values, "tuned_by": tuned}


@dataclass
class Precondition:
    text: str                      # what must hold of the task, e.g. "baseline ZSL > 2x chance"
    value: str                     # what was measured, printed, e.g. "ZSL 0.41 (chance 0.20)"
    holds: bool | None             # None: not measured


def welch_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The `confidence` interval of mean(a) - mean(b) under Welch's t (unequal variances), or
    None with fewer than two values on a side. Zero variance on both sides gives the point."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    diff = statistics.mean(a) - statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return diff, diff
    wa, wb = va / (va + vb), vb / (va + vb)         # (scaled first: squares of tiny variances underflow)
    dof = 1.0 / (wa ** 2 / (len(a) - 1) + wb ** 2 / (len(b) - 1))
    # float(): scipy's numpy scalar would make every comparison with it a numpy bool, which the
    # JSON writer refuses.
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * math.sqrt(va + vb)
    return diff - half, diff + half


def verdict(interval: tuple[float, float] | None, precondition: Precondition) -> str:
    if not precondition.holds:
        return "not testable here"
    if interval is None:
        return "inconclusive"
    lo, hi = interval
    return "held" if lo > 0 else "not held" if hi < 0 else "inconclusive"


def _summary(r: dict) -> dict:
    """A row's variant, mean, std and n: the two sides of a claim, as the report tabulates them."""
    return {k: r[k] for k in ("variant", "mean", "std", "n", "tuned_by")}


def claim(text: str, better: dict, worse: dict, precondition: Precondition,
          higher_is_better: bool = True) -> dict:
    sign = 1 if higher_is_better else -1
    a, b = ([sign * v for v in r["values"]] for r in (better, worse))
    interval = welch_interval(a, b)
    return {"claim": text, "method": better["method"], "task": better["task"], "metric": better["metric"],
            "better": _summary(better), "worse": _summary(worse), "verdict": verdict(interval, precondition),
            "held": {"held": True, "not held": False}.get(verdict(interval, precondition)),
            "precondition": asdict(precondition),
            "improvement_ci": None if interval is None else list(interval),   # in the claim's direction
            "evidence": f"{better['variant']} {better['mean']:.4f} ± {better['std']:.4f} vs "
                        f"{worse['variant']} {worse['mean']:.4f} ± {worse['std']:.4f} "
                        f"({better['metric']}, n={better['n']}/{worse['n']})"}


def result_files(name: str) -> list[str]:
    """A benchmark's results: bench/results/<name>.json (its default task) and every
    <name>_<dataset>.json written for another built-in dataset (`--dataset`)."""
    import methodlab.data  # noqa: F401  (fills the dataset registry)
    from methodlab.registry import dataset_names

    other = sorted(p.stem for p in RESULTS.glob(f"{name}_*.json") if p.stem[len(name) + 1:] in dataset_names())
    return [n for n in [name, *other] if (RESULTS / f"{n}.json").exists()]


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _mean(values) -> float:
    return statistics.mean(values)


def _measured(d: dict, key: str):
    """A per-seed list the benchmark recorded under `key` (None if this run did not measure it)."""
    return d.get("preconditions", {}).get(key)


def bad_batches(d: dict):
    runs = d["accuracy_runs"]          # {"batch32_curated": [{"seed", "test_linear_acc", ...}, ...], ...}
    task = d.get("dataset", "digits")
    raw = _measured(d, "raw_pixel_probe")          # per-seed test accuracy of a linear probe on raw pixels
    rows, claims = [], []
    if raw:
        rows.append(row("bad_batches", "raw-pixel probe", "test_linear_acc", raw, task))
    if _measured(d, "random_init_probe"):
        rows.append(row("bad_batches", "random-init encoder probe", "test_linear_acc",
                        _measured(d, "random_init_probe"), task))
    for bs in sorted({int(k.split("_")[0][len("batch"):]) for k in runs}):
        cur, unc = (row("bad_batches", f"{v} (batch {bs})", "test_linear_acc",
                        [r["test_linear_acc"] for r in runs[f"batch{bs}_{v}"]], task) for v in ("curated", "uncurated"))
        rows += [cur, unc]
        pre = Precondition("the uncurated SimCLR probe beats the raw-pixel probe",
                           f"{unc['mean']:.4f} vs {_mean(raw):.4f}" if raw else "raw-pixel probe not measured",
                           bool(raw) and welch_interval(unc["values"], raw) is not None
                           and welch_interval(unc["values"], raw)[0] > 0)
        claims.append(claim(f"FRD curation improves SimCLR's linear probe at batch {bs} ({task})", cur, unc, pre))
    return rows, claims


def toast(d: dict):
    task = d.get("dataset", "digits_transfer")
    rows = [row("toast", mode, "target test_acc", v["per_seed"], task, d.get("tuned", {}).get(mode, NOT_SWEPT))
            for mode, v in d["accuracy"].items()]
    by = {r["variant"]: r for r in rows}
    random_init = _measured(d, "random_init_linear")   # linear probe on a random-init backbone, per seed
    pre = Precondition("the pretrained backbone's linear probe beats a random-init backbone's",
                       f"{by['linear']['mean']:.4f} vs {_mean(random_init):.4f}" if random_init
                       else "random-init probe not measured",
                       bool(random_init) and (welch_interval(by["linear"]["values"], random_init) or (0, 0))[0] > 0)
    return rows, [claim(f"TOAST beats full fine-tuning ({task})", by["toast"], by["finetune"], pre),
                  claim(f"TOAST beats a linear probe ({task})", by["toast"], by["linear"], pre)]


def d3gzsl(d: dict):
    task = d.get("dataset", "digits_gzsl")
    per_seed = d.get("per_seed") or d["digits_per_seed"]      # variant -> metric -> [per seed]
    rows = [row("d3gzsl", variant, "test_H", v["test_H"], task) for variant, v in per_seed.items()]
    by = {r["variant"]: r for r in rows}
    chance = 1.0 / d["num_unseen_classes"] if d.get("num_unseen_classes") else None
    claims = []
    for base, what in (("baseline", "D3GZSL without distillation"), ("fclswgan", "f-CLSWGAN")):
        if base not in per_seed:
            continue
        zsl, u, s = (_mean(per_seed[base][k]) for k in ("test_ZSL", "test_U", "test_S"))
        # S as well as U: a baseline that recognises no seen class (f-CLSWGAN's softmax on
        # shapes_gzsl before calibrated stacking could favour the seen classes and its learning
        # rate was chosen on val: S ~ 0) has H ~ 0 for reasons that say nothing about distillation.
        pre = Precondition(f"{what}'s ZSL accuracy above twice chance, its U > 0.1 and its S > 0.1",
                           (f"ZSL {zsl:.4f} (chance {chance:.4f})" if chance else f"ZSL {zsl:.4f}, chance unknown")
                           + f", U {u:.4f}, S {s:.4f}",
                           chance is not None and zsl > 2 * chance and u > 0.1 and s > 0.1)
        claims += [claim(f"D3GZSL ({v}) beats {what} on H ({task})", by[f"d3gzsl-{v}"], by[base], pre)
                   for v in ("faithful", "clean") if f"d3gzsl-{v}" in by]
    return rows, claims


def mmanet(d: dict):
    task = d.get("dataset", "digits_multimodal")
    combos = d["combinations"]                     # e.g. ["image", "edges", ..., "image-edges-profiles"]
    per_seed = d["per_seed_test_acc"]              # variant -> [per seed: [acc per combination]]
    rows = [row("mmanet", variant, "test mean acc over combinations", [_mean(s) for s in seeds], task,
                d.get("tuned", {}).get(variant, NOT_SWEPT)) for variant, seeds in per_seed.items()]
    by = {r["variant"]: r for r in rows}
    full = max(range(len(combos)), key=lambda i: len(combos[i].split("-")))
    singles = [i for i, c in enumerate(combos) if "-" not in c]
    gap = _mean([s[full] - min(s[i] for i in singles) for s in per_seed["dropout"]])
    caps = _bayes_accuracy(task)       # {"rgb+texture": 0.25, ...} where the task knows its ceilings
    if caps is None:
        pre = Precondition("missing modalities hurt: the dropout baseline's all-modality accuracy exceeds its "
                           "worst single modality's by more than 0.05", f"gap {gap:.4f}", gap > 0.05)
    else:
        # Where the task's best possible accuracy per combination is known, MAD and MAR also need
        # room below it: a baseline at the ceiling leaves them nothing to add.
        room = _mean([_mean([caps[c.replace("-", "+")] - s[i] for i, c in enumerate(combos)])
                      for s in per_seed["dropout"]])
        pre = Precondition("missing modalities hurt (all-modality minus worst single-modality accuracy of the "
                           "dropout baseline > 0.05) and the baseline has room below the task's Bayes accuracy "
                           "(mean over combinations > 0.02)", f"gap {gap:.4f}, room {room:.4f}",
                           gap > 0.05 and room > 0.02)
    return rows, [claim(f"MMANet beats plain modality dropout ({task})", by["MMANet"], by["dropout"], pre),
                  claim(f"MAD alone helps ({task})", by["dropout+MAD"], by["dropout"], pre),
                  claim(f"MAR alone helps ({task})", by["dropout+MAR"], by["dropout"], pre)]


@functools.lru_cache(maxsize=None)
def _bayes_accuracy(task: str) -> dict | None:
    """The best accuracy each modality combination of a built-in synthetic task allows (its meta's
    `bayes_accuracy`), or None for a task that does not know it."""
    import methodlab.data  # noqa: F401  (fills the dataset registry)
    from methodlab.registry import DATASETS, dataset_names, get_dataset_builder

    if DATASETS.canonical(task) not in dataset_names():
        return None
    return get_dataset_builder(task)()["meta"].get("bayes_accuracy")


def canonicalization(d: dict):
    task = d.get("dataset", "digits")
    acc = d["accuracy"]
    rows = [row("canonicalization", variant, "test group_acc", v["group_acc"], task,
                d.get("tuned", {}).get(variant, NOT_SWEPT)) for variant, v in acc.items()]
    by = {r["variant"]: r for r in rows}
    claims = []
    for g in ("c4", "c8"):
        plain = acc[f"plain_{g}"]
        drop = _mean(plain["upright_acc"]) - _mean(plain["group_acc"])
        pre = Precondition(f"the plain model fails on rotated copies: upright minus {g.upper()} group accuracy > 0.1",
                           f"{drop:.4f}", drop > 0.1)
        for base in ("plain", "augment", "group_average", "equivariant"):
            claims.append(claim(f"learned canonicalization beats {base.replace('_', ' ')} on rotated images "
                                f"({g.upper()}, {task})", by[f"canonicalize_{g}"], by[f"{base}_{g}"], pre))
    return rows, claims


ADAPTERS = {"bad_batches": bad_batches, "toast": toast, "d3gzsl": d3gzsl, "mmanet": mmanet,
            "canonicalization": canonicalization}


def counts(claims: list[dict]) -> dict[str, int]:
    out = {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}
    return {"claims": len(claims), "testable here": len(claims) - out["not testable here"], **out}


def main() -> None:
    quality, claims, missing = [], [], []
    for name, adapter in ADAPTERS.items():
        files = result_files(name)
        if not files:
            missing.append(name)
        for file in files:
            rows, cl = adapter(load(file))
            quality += rows
            claims += cl
    for c in claims:
        print(f"{c['verdict']:18s} {c['claim']}: {c['evidence']}; precondition "
              f"{c['precondition']['text']}: {c['precondition']['value']}")
    n = counts(claims)
    testable = n["testable here"]
    figures = [Figure("claims_held_of_testable", n["held"] / testable if testable else None,
                      f"{testable} of {n['claims']} paper claims testable here", n)]
    write_results("quality", figures, {"quality": quality, "claims": claims, "counts": n, "missing": missing,
                                       "confidence": CONFIDENCE})


if __name__ == "__main__":
    main()
