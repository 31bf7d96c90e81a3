"""The quality table: each method against its baselines, mean ± std over seeds, with the paper's
claimed direction and whether it held here. It reads the per-method benchmark results
(bench/results/<method>.json, written by bench/<method>.py) and writes bench/results/quality.json,
which `methodlab report` renders. Numbers are whatever was measured.

    .venv/bin/python bench/quality.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, Figure, write_results  # noqa: E402


def row(method: str, variant: str, metric: str, values: list[float]) -> dict:
    return {"method": method, "variant": variant, "metric": metric, "n": len(values),
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def claim(text: str, better: dict, worse: dict, higher_is_better: bool = True) -> dict:
    """held: True / False, or None ("inconclusive") when the means differ by less than the
    larger of the two seed standard deviations."""
    diff = (better["mean"] - worse["mean"]) * (1 if higher_is_better else -1)
    held = None if abs(diff) <= max(better["std"], worse["std"]) else diff > 0
    return {"claim": text, "held": held,
            "evidence": f"{better['variant']} {better['mean']:.4f} ± {better['std']:.4f} vs "
                        f"{worse['variant']} {worse['mean']:.4f} ± {worse['std']:.4f} ({better['metric']}, n={better['n']})"}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def bad_batches(d: dict):
    runs = d["accuracy_runs"]          # {"batch32_curated": [{"seed", "test_linear_acc", ...}, ...], ...}
    rows, claims = [], []
    for bs in sorted({int(k.split("_")[0][len("batch"):]) for k in runs}):
        cur, unc = (row("bad_batches", f"{v} (batch {bs})", "test_linear_acc",
                        [r["test_linear_acc"] for r in runs[f"batch{bs}_{v}"]]) for v in ("curated", "uncurated"))
        rows += [cur, unc]
        claims.append(claim(f"FRD curation improves SimCLR's linear probe at batch {bs}", cur, unc))
    return rows, claims


def toast(d: dict):
    rows = [row("toast", mode, "target test_acc", v["per_seed"]) for mode, v in d["accuracy"].items()]
    by = {r["variant"]: r for r in rows}
    return rows, [claim("TOAST beats full fine-tuning", by["toast"], by["finetune"]),
                  claim("TOAST beats a linear probe", by["toast"], by["linear"])]


def d3gzsl(d: dict):
    rows = [row("d3gzsl", variant, "test_H", v["test_H"]) for variant, v in d["digits_per_seed"].items()]
    by = {r["variant"]: r for r in rows}
    return rows, [claim("D3GZSL (faithful) beats the generative baseline on H", by["d3gzsl-faithful"], by["baseline"]),
                  claim("D3GZSL (clean) beats the generative baseline on H", by["d3gzsl-clean"], by["baseline"])]


def mmanet(d: dict):
    rows = [row("mmanet", variant, "test mean acc over 7 combinations", [statistics.mean(s) for s in seeds])
            for variant, seeds in d["per_seed_test_acc"].items()]
    by = {r["variant"]: r for r in rows}
    return rows, [claim("MMANet beats plain modality dropout", by["MMANet"], by["dropout"]),
                  claim("MAD alone helps", by["dropout+MAD"], by["dropout"]),
                  claim("MAR alone helps", by["dropout+MAR"], by["dropout"])]


def canonicalization(d: dict):
    rows = []
    for variant, v in d["accuracy"].items():
        rows.append(row("canonicalization", variant, "test group_acc", v["group_acc"]))
    by = {r["variant"]: r for r in rows}
    claims = []
    for g in ("c4", "c8"):
        for base in ("plain", "augment", "group_average", "equivariant"):
            claims.append(claim(f"learned canonicalization beats {base.replace('_', ' ')} on rotated digits ({g.upper()})",
                                by[f"canonicalize_{g}"], by[f"{base}_{g}"]))
    return rows, claims


VERDICT = {True: "held", False: "not held", None: "inconclusive"}
ADAPTERS = {"bad_batches": bad_batches, "toast": toast, "d3gzsl": d3gzsl, "mmanet": mmanet,
            "canonicalization": canonicalization}


def main() -> None:
    quality, claims, figures, missing = [], [], [], []
    for name, adapter in ADAPTERS.items():
        d = load(name)
        if d is None:
            missing.append(name)
            continue
        rows, cl = adapter(d)
        quality += rows
        claims += cl
    for c in claims:
        print(f"{VERDICT[c['held']]:12s} {c['claim']}: {c['evidence']}")
    counts = {v: sum(c["held"] is k for c in claims) for k, v in VERDICT.items()}
    figures.append(Figure("claims_held_fraction", counts["held"] / max(len(claims), 1),
                          f"{len(claims)} paper claims", counts))
    write_results("quality", figures, {"quality": quality, "claims": claims, "missing": missing})


if __name__ == "__main__":
    main()
