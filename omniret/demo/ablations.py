"""The real benchmark's baseline and ablations, several seeds each, with one budget: the table and plot of
docs/real_ablations.md.

    python -m omniret.demo.ablations --output out/ablations --seeds 0 1 2 [--steps 300] [--variants ...]

Every run trains through the one Trainer (omniret/demo/real_demo.py `train_and_evaluate`) with the same steps,
batches and evaluation. A run writes `<output>/runs/<variant>-s<seed>.json` when it ends, and a later call skips
the runs already there, so a killed sweep goes on where it stopped. `--jobs N` runs N runs side by side in
separate processes, each with `--threads` threads (on 2 cores, 2 single-threaded runs finish sooner than 2
consecutive two-threaded ones: a step's small matrices keep one core busier than two).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from omniret.files import atomic_path, atomic_write_json, atomic_write_text

# name -> (what it tests, RealDemoOptions changes). Table 5 of the paper: (a) pooling, (d) media resampler;
# the loss terms of Eq. 10.
VARIANTS = {
    "omniret": ("the real preset: shared resampler with modality latents, ASWP, full loss", {}),
    "dual_encoder": ("CLIP-style dual encoder: mean-pooled frozen features, projection heads, symmetric InfoNCE, "
                     "parts summed (UniIR's score-level fusion)", {"baseline": True}),
    "dual_encoder_learned_fusion": ("the dual encoder with a learned fusion of a composed query's parts (a small "
                                    "transformer that starts as the sum) instead of the sum",
                                    {"baseline": True, "baseline_fusion": "transformer"}),
    "pool_eos": ("pooling: last token instead of ASWP", {"model_overrides": {"pooling": "eos"}}),
    "pool_mean": ("pooling: mean over tokens instead of ASWP", {"model_overrides": {"pooling": "mean"}}),
    "pool_instruction": ("the paper's pooling input: the instruction's tokens pooled too (the preset leaves them out)",
                         {"model_overrides": {"pool_instruction": True}}),
    "raw_features": ("the frozen tokens as the encoders give them (the preset standardises them per channel)",
                     {"model_overrides": {"standardize_media": False}}),
    "slow_projector": ("the projectors at the resamplers' rate (1e-4; the preset gives them 1e-3)",
                       {"projector_lr": 1e-4}),
    "adamw_projectors": ("the projectors' matrices on AdamW at the projectors' rate (1e-3; the preset steps them with "
                         "Muon at 3e-3)", {"projector_muon_lr": 0.0}),
    "adamw_resamplers": ("the resamplers' matrices on AdamW at their rate (1e-4; the preset steps them with Muon at 1e-3)",
                         {"muon_lr": 0.0}),
    # Table 5 (b): the pooling head's S (its output latents, and ASWP's references M = S; the preset has 4)
    **{f"output_latents_{s}": (f"S = {s} output latents and ASWP references instead of 4",
                               {"model_overrides": {"output_latents": s}}) for s in (2, 8, 16)},
    # the media tokens the LLM reads per item (the preset has 8): fewer give a composed query's text more weight
    **{f"media_latents_{n}": (f"{n} resampled tokens per media item into the LLM instead of 8",
                              {"model_overrides": {"media_latents": n}}) for n in (2, 4, 16)},
    # Table 5 (c): how ASWP pools each slice's displacements over the references (the preset: STM)
    **{f"aswp_{name}": (f"ASWP pools each slice by {what} instead of the straight-through maximum",
                        {"model_overrides": {"aswp_pooling": name}})
       for name, what in (("max", "a plain maximum"), ("mean", "the mean"), ("weighted", "a learnable weighted sum"))},
    "no_media_latents": ("the shared resampler without its per-modality latents (Table 5 d)",
                         {"model_overrides": {"media_resampler": "shared_no_latents"}}),
    "no_resampler": ("no media resampler: projected encoder tokens go to the LLM",
                     {"model_overrides": {"media_resampler": "none"}}),
    "separate_resamplers": ("one resampler per modality instead of one shared",
                            {"model_overrides": {"media_resampler": "separate"}}),
    "no_diversity": ("without the diversity loss (mu2 = 0)", {"mu2": 0.0}),
    "no_triplet": ("without the triplet loss (mu1 = 0)", {"mu1": 0.0}),
    # the loss the dual encoder trains with, for OmniRet: does the loss explain the baseline's lead?
    "symmetric_loss": ("CLIP's symmetric InfoNCE (the dual encoder's: query->candidate and candidate->query "
                       "averaged) in place of the paper's query->candidate term", {"symmetric": True}),
    "dual_encoder_loss": ("the dual encoder's whole loss: symmetric plain InfoNCE (beta 0) with CLIP's learnable "
                          "temperature, no triplet or diversity term",
                          {"symmetric": True, "beta": 0.0, "learnable_temperature": True, "mu1": 0.0, "mu2": 0.0}),
    # the batch: the paper trains at 3072 pairs a step, the preset at 56; both models see the same batches
    "omniret_batch_112": ("twice the batch: 16 training pairs of each task per step (112) instead of 8",
                          {"per_task": 16, "per_composed_task": 16}),
    "dual_encoder_batch_112": ("the dual encoder at twice the batch (112 pairs per step)",
                               {"baseline": True, "per_task": 16, "per_composed_task": 16}),
    "omniret_batch_224": ("four times the batch: 32 training pairs of each task per step (224) instead of 8",
                          {"per_task": 32, "per_composed_task": 32}),
    "dual_encoder_batch_224": ("the dual encoder at four times the batch (224 pairs per step)",
                               {"baseline": True, "per_task": 32, "per_composed_task": 32}),
    # training data: the benchmark built with the unchanged emoji as each emoji training query's hard negative
    "omniret_reference_negatives": ("the unchanged emoji as each emoji training query's hard negative (one per query "
                                    "per step)", {"reference_negatives": True, "hard_negatives": 1}),
    "dual_encoder_reference_negatives": ("the dual encoder with the unchanged emoji as each emoji training query's "
                                         "hard negative", {"baseline": True, "reference_negatives": True,
                                                           "hard_negatives": 1}),
    # ... and its siblings: the other tones, the other gender; only the change text tells them from the target
    "omniret_sibling_negatives": ("the other variants of the same change (other skin tones, the other gender) as "
                                  "each emoji training query's hard negatives (one per query per step)",
                                  {"sibling_negatives": True, "hard_negatives": 1}),
    "dual_encoder_sibling_negatives": ("the dual encoder with the other variants of the same change as each emoji "
                                       "training query's hard negatives", {"baseline": True,
                                                                          "sibling_negatives": True,
                                                                          "hard_negatives": 1}),
    # both: the unchanged emoji and the siblings, one of them per query per step
    "omniret_reference_sibling_negatives": ("the unchanged emoji and the other variants of the same change as each "
                                            "emoji training query's hard negatives (one per query per step)",
                                            {"reference_negatives": True, "sibling_negatives": True,
                                             "hard_negatives": 1}),
    "dual_encoder_reference_sibling_negatives": ("the dual encoder with the unchanged emoji and the other variants "
                                                 "of the same change as hard negatives",
                                                 {"baseline": True, "reference_negatives": True,
                                                  "sibling_negatives": True, "hard_negatives": 1}),
    "omniret_reference_sibling_negatives_dual_loss": ("the unchanged emoji and the siblings as hard negatives, and "
                                                      "the dual encoder's whole loss (dual_encoder_loss)",
                                                      {"reference_negatives": True, "sibling_negatives": True,
                                                       "hard_negatives": 1, "symmetric": True, "beta": 0.0,
                                                       "learnable_temperature": True, "mu1": 0.0, "mu2": 0.0}),
}


def variant_options(variant: str, seed: int, args) -> tuple:
    """(RealDemoOptions, trains the baseline) of one run. A variant that builds another benchmark (its training
    files differ) gets, under --data-dir, a folder beside it named by that build's key, never the given one."""
    from omniret.demo import real_demo

    changes = dict(VARIANTS[variant][1])
    baseline = changes.pop("baseline", False)
    opts = real_demo.RealDemoOptions(output=os.path.join(args.output, "work", f"{variant}-s{seed}"), seed=seed,
                                     steps=args.steps, data_dir=args.data_dir, feature_cache=args.feature_cache,
                                     max_items=args.max_items, max_eval_queries=args.max_eval_queries,
                                     progress=False, checkpoint_every=0, **changes)
    build = real_demo.benchmark_config(opts).key()
    if args.data_dir and build != real_demo.benchmark_config(real_demo.RealDemoOptions(
            output="", max_items=args.max_items)).key():
        opts.data_dir = f"{args.data_dir.rstrip(os.sep)}-{build}"
    return opts, baseline


def run_one(variant: str, seed: int, args) -> dict:
    """Train and evaluate one variant with one seed in this process; returns its record."""
    from omniret.demo import real_demo
    from omniret.threads import apply_threads

    apply_threads(args.threads)
    opts, baseline = variant_options(variant, seed, args)
    root = real_demo.ensure_benchmark(opts)
    real_demo.ensure_features(root, opts)
    data = real_demo.train_set(root, opts)
    tasks, pools = real_demo.eval_tasks(root, opts)
    model = real_demo.build_baseline(opts) if baseline else real_demo.build_model(opts)
    results, train, seconds = real_demo.train_and_evaluate(model, data, tasks, pools, opts,
                                                           os.path.join(opts.output, "train"), baseline=baseline)
    return {"variant": variant, "seed": seed, "steps": train.steps, "stopped": train.stopped,
            "tasks": {real_demo._task_name(t): m for t, m in results.tasks.items()}, "seconds": seconds,
            "threads": args.threads, "options": dataclasses.asdict(opts)}


def prepare(todo: list, args) -> None:
    """Build each benchmark the runs to do read, here, one after the other: runs side by side would otherwise
    build one folder at the same time. (Their frozen features are left to them: each cache entry is written
    atomically, and loading every feature here would hold ~1 GB in this process for the whole sweep.)"""
    from omniret.demo import real_demo

    done: set = set()
    for variant, seed in todo:
        opts, _ = variant_options(variant, seed, args)
        where = (opts.data_dir, real_demo.benchmark_config(opts).key())
        if where not in done:
            done.add(where)
            real_demo.ensure_benchmark(opts)


def record_path(output: str, variant: str, seed: int) -> str:
    return os.path.join(output, "runs", f"{variant}-s{seed}.json")


def sweep(args) -> list:
    """Every (variant, seed) without a record, run by `args.jobs` worker processes."""
    # seed-major: a sweep stopped early still has every variant at its first seeds
    todo = [(v, s) for s in args.seeds for v in args.variants if not os.path.exists(record_path(args.output, v, s))]
    print(f"ablations: {len(todo)} runs to do of {len(args.variants) * len(args.seeds)}", flush=True)
    prepare(todo, args)
    running: list = []
    while todo or running:
        while todo and len(running) < args.jobs:
            variant, seed = todo.pop(0)
            cmd = [sys.executable, "-m", "omniret.demo.ablations", "--one", variant, str(seed)] + _forward(args)
            log = open(os.path.join(args.output, "logs", f"{variant}-s{seed}.log"), "w")
            running.append(((variant, seed), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log,
                            time.perf_counter()))
        time.sleep(2)
        for entry in list(running):
            (variant, seed), proc, log, t0 = entry
            if proc.poll() is None:
                continue
            log.close()
            running.remove(entry)
            state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see logs/{variant}-s{seed}.log)"
            print(f"ablations: {variant} seed {seed}: {state} in {time.perf_counter() - t0:.0f}s", flush=True)
    return load_records(args)


def load_records(args) -> list:
    """The records already written for args.variants x args.seeds (variant-major), skipping runs not done."""
    records = []
    for variant in args.variants:
        for seed in args.seeds:
            path = record_path(args.output, variant, seed)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    records.append(json.load(f))
    return records


def _forward(args) -> list:
    out = ["--output", args.output, "--steps", str(args.steps), "--threads", str(args.threads)]
    for flag, value in (("--data-dir", args.data_dir), ("--feature-cache", args.feature_cache),
                        ("--max-items", args.max_items), ("--max-eval-queries", args.max_eval_queries)):
        if value is not None:
            out += [flag, str(value)]
    return out


def summarise(records: list) -> dict:
    """variant -> task -> metric -> {"mean", "std", "min", "max", "n"} over seeds."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == variant]
        tasks = runs[0]["tasks"]
        out[variant] = {}
        for task in tasks:
            out[variant][task] = {}
            for metric in tasks[task]:
                values = [r["tasks"][task][metric] for r in runs]
                out[variant][task][metric] = {"mean": statistics.fmean(values),
                                              "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                              "min": min(values), "max": max(values), "n": len(values)}
    return out


def table(summary: dict, metric: str = "R@5") -> str:
    """Markdown: one row per variant, one column per task (mean +- std over seeds, in points), and the means of
    the composed and single-modality tasks."""
    from omniret.data.real_benchmark import COMPOSED_TASKS

    tasks = list(next(iter(summary.values())))
    short = {t: t.replace("_", " ") for t in tasks}
    lines = [f"| variant | {' | '.join(short[t] for t in tasks)} | composed mean | single mean |",
             "|---|" + "---:|" * (len(tasks) + 2)]
    for variant, per_task in summary.items():
        cells = [f"{100 * per_task[t][metric]['mean']:.1f}" + (f" ± {100 * per_task[t][metric]['std']:.1f}"
                                                               if per_task[t][metric]["n"] > 1 else "") for t in tasks]
        comp = [per_task[t][metric]["mean"] for t in tasks if t in COMPOSED_TASKS]
        single = [per_task[t][metric]["mean"] for t in tasks if t not in COMPOSED_TASKS]
        lines.append(f"| {variant} | {' | '.join(cells)} | {100 * statistics.fmean(comp):.1f} | "
                     f"{100 * statistics.fmean(single):.1f} |")
    return "\n".join(lines)


def plot(records: list, path: str, metric: str = "R@5") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = list(dict.fromkeys(r["variant"] for r in records))
    tasks = list(records[0]["tasks"])
    fig, ax = plt.subplots(figsize=(13, 4.2))
    width = 0.8 / len(variants)
    # the default cycle has 10 colours: more variants would share one
    colours = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20").colors
    for k, variant in enumerate(variants):
        runs = [r for r in records if r["variant"] == variant]
        x = np.arange(len(tasks)) + (k - (len(variants) - 1) / 2) * width
        means = [statistics.fmean(r["tasks"][t][metric] for r in runs) for t in tasks]
        ax.bar(x, means, width, label=variant, color=colours[k % len(colours)])
        for r in runs:  # every seed as a dot: the spread is seen, not summarised
            ax.scatter(x, [r["tasks"][t][metric] for t in tasks], s=5, color="black", zorder=3)
    ax.set_xticks(np.arange(len(tasks)), [t.replace("_", "\n", 1) for t in tasks], fontsize=7)
    ax.set_ylabel(f"test {metric}")
    ax.set_ylim(0, 1)
    # below the axes: inside, a legend of many variants covered the tallest bars
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.set_title(f"real benchmark: {metric} per task, mean over seeds (dots: each seed)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--feature-cache", default=None)
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--max-eval-queries", type=int, default=None)
    p.add_argument("--report", action="store_true",
                   help="write the summary, table and plot from the records already there; run nothing")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.jobs < 1 or args.threads < 1:
        p.error("--steps, --jobs and --threads must be >= 1")
    for sub in ("runs", "logs", "work"):
        os.makedirs(os.path.join(args.output, sub), exist_ok=True)
    if args.one:
        variant, seed = args.one[0], int(args.one[1])
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant!r}")
        atomic_write_json(record_path(args.output, variant, seed), run_one(variant, seed, args), indent=1)
        return 0
    records = load_records(args) if args.report else sweep(args)
    if not records:
        print("ablations: no run finished", file=sys.stderr)
        return 1
    summary = summarise(records)
    atomic_write_json(os.path.join(args.output, "summary.json"), summary, indent=1)
    seeds = {v: sum(r["variant"] == v for r in records) for v in summary}
    text = "\n\n".join(f"### {metric}\n\n{table(summary, metric)}" for metric in ("R@5", "R@1", "R@10"))
    text = "Seeds per variant: " + ", ".join(f"{v} {n}" for v, n in seeds.items()) + ".\n\n" + text
    atomic_write_text(os.path.join(args.output, "table.md"), text + "\n")
    plot(records, os.path.join(args.output, "ablations.png"))
    print(text)
    missing = len(args.variants) * len(args.seeds) - len(records)
    return 0 if missing == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
