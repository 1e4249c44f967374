"""The main job on real media, end to end: the real benchmark (omniret/data/real_benchmark.py: drawings, stamps,
human recordings and emoji, written as M-BEIR-format files; built once and cached) -> the frozen encoders'
features (computed once per file and cached: omniret/data/frozen_features.py) -> the `real` preset trained by
the one Trainer -> the CLIP-style dual-encoder baseline trained by the same Trainer on the same features, with
the same steps and batches -> Recall@1/5/10 of both on every task's test gallery -> results.json (ours, and the
baseline under "baselines") / results.md / a plot -> a searchable index of the test galleries and one search.

`omniret demo` (omniret/commands/demo.py) runs this by default (`--benchmark real`); `--benchmark digits` is the
digits fixture (omniret/demo/digits_demo.py). omniret/demo/ablations.py runs the variants and seeds of the
docs' table through `train_and_evaluate`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from omniret.demo import holds_output_lock
from omniret.eval.evaluate import Results, evaluate
from omniret.files import atomic_path, atomic_write_text, read_jsonl_log

COMPOSED_MARGIN = 0.05  # the goal: composed tasks, mean R@5 at least 5 points above the dual encoder's
SINGLE_TOLERANCE = 0.02  # single-modality tasks: mean R@5 at most 2 points below it
# The Muon group's names: the resampler blocks' matrices (media_resampler[.<modality>].layers.<i>...,
# head.hidden_state_resampler.layers.<i>...). LoRA's group comes first and the LLM's own weights are frozen, so
# no other trainable matrix has this in its name; the latents and ASWP's directions are not in a block.
MUON_MODULES = (".layers.",)


@dataclass
class RealDemoOptions:
    output: str
    # A fixed number of steps: the result depends on the seed, not on the machine's speed or load. 150 steps of
    # 56 pairs (~1.4 epochs of the 6,124 training queries) keep the README's main command under 10 minutes with the
    # data cached (docs/real_benchmark.md has the timings)
    steps: int = 150
    # the paper's stage 1 (section 5.1): the first `stage1_steps` of `steps` train only the new modules
    # (projectors, resamplers, pooling head; no LoRA) on the single-modality tasks, at `stage1_lr`. Off: at this
    # budget it gained nothing at 1e-4 and lost the composed image task at 1e-3 (docs/real_benchmark.md)
    stage1_steps: int = 0
    stage1_lr: float = 1e-4
    per_task: int = 8  # training pairs of each of the 7 tasks per step
    per_composed_task: int = 8
    lr: float = 1e-4  # the resamplers' latents and norms, ASWP (and the resamplers' matrices when muon_lr is 0)
    # the projectors (encoder tokens -> the LLM's width) learn at 10x `lr`: at 1e-4 they stay near their random
    # start in 150 steps; at 1e-3, single-modality R@5 +4.0 / 0.0 / +0.8 points on seeds 0-2 (docs/real_benchmark.md,
    # "Learning rates per module"). The resamplers on AdamW at 1e-3 collapse every item to one embedding
    projector_lr: float = 1e-3
    # the projectors' matrices step with Muon at this rate, their biases with AdamW at `projector_lr`. On AdamW the
    # image projector's output lost most of its dimensions in 150 steps (effective rank ~55 -> ~10 over 300 test
    # images; docs/real_benchmark.md, "Underfitting, and a dimensional collapse in the projectors").
    # 0: AdamW at `projector_lr` for the whole projectors
    projector_muon_lr: float = 3e-3
    # the resamplers' attention and MLP matrices (the media resampler's and the pooling head's) step with Muon at
    # this rate (omniret.train.optim says why); their latents and norms keep AdamW at `lr`. 0: AdamW at `lr`
    muon_lr: float = 1e-3
    lora_lr: float = 1e-3
    baseline_lr: float = 1e-3  # the dual encoder's heads start from scratch
    # how the dual encoder combines a composed item's parts: "sum" (UniIR's score-level fusion, the baseline) or
    # "transformer" (a learned fusion that starts as the sum: omniret.baselines.dual_encoder.PartFusion)
    baseline_fusion: str = "sum"
    warmup: float = 0.05
    seed: int = 0
    pooling: str = "aswp"
    # model overrides on top of the `real` preset (the ablations: media_resampler, pooling, ...)
    model_overrides: dict = field(default_factory=dict)
    mu1: float = 1.0  # triplet weight (0: without the triplet loss)
    mu2: float = 0.1  # diversity weight (0: without the diversity loss)
    triplet: str = "mean"
    symmetric: bool = False  # CLIP's symmetric InfoNCE (the dual encoder's) instead of the paper's query->candidate
    beta: float = 0.5  # Eq. 3's weighting of the harder negatives (0: plain InfoNCE, the dual encoder's)
    learnable_temperature: bool = False  # CLIP's learnable temperature from 0.07 (the dual encoder's) instead of fixed
    hard_negatives: int = 0  # of each training query's neg_cand_list per step (the default build lists none)
    # build the benchmark with the unchanged emoji as each emoji training query's hard negative
    # (RealConfig.reference_negatives; used with hard_negatives >= 1)
    reference_negatives: bool = False
    # ... with the other variants of the same change as hard negatives (RealConfig.sibling_negatives)
    sibling_negatives: bool = False
    chunk_size: int = 64
    keep_graphs: int = 2
    baseline: bool = True
    data_dir: str | None = None  # the benchmark's root (default: a cache folder named by its configuration)
    feature_cache: str | None = None  # frozen features (default $OMNIRET_CACHE/features)
    max_items: int | None = None  # per source: a seeded subset (tests, development)
    max_eval_queries: int | None = None
    eval_batch_size: int = 128
    build_index: bool = True
    time_budget: float | None = None
    min_steps: int | None = None
    resume: bool = False
    checkpoint_every: int = 50
    threads: int | None = None
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------
# data and features
# ---------------------------------------------------------------------------------------------------------
def benchmark_config(opts: RealDemoOptions):
    from omniret.data.real_benchmark import RealConfig

    return RealConfig(seed=0, max_items=opts.max_items, reference_negatives=opts.reference_negatives,
                      sibling_negatives=opts.sibling_negatives)


def default_data_dir(cfg) -> str:
    base = os.environ.get("OMNIRET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omniret")
    return os.path.join(base, "benchmarks", f"real-{cfg.key()}")


def ensure_benchmark(opts: RealDemoOptions, log=print) -> str:
    """The benchmark's root, built on the first call (its manifest is written last: a root with one was built
    whole with this configuration)."""
    from omniret.data.real_benchmark import MANIFEST, RealConfig, build

    cfg = benchmark_config(opts)
    root = opts.data_dir or default_data_dir(cfg)
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            built = json.load(f).get("config")
        # the same build: fields added since take their defaults, the worker count does not matter
        previous = RealConfig.from_manifest(built)
        if previous is not None and previous.identity() == cfg.identity():
            log(f"benchmark: {root} (cached)")
            return root
        log(f"benchmark: {root} was built with {built}; rebuilding with {asdict(cfg)}")
    t0 = time.perf_counter()
    build(root, cfg, log=log)
    log(f"benchmark: built {root} in {time.perf_counter() - t0:.0f}s")
    return root


def ensure_features(root: str, opts: RealDemoOptions, log=print) -> dict:
    """Every media file's frozen features, into the process's feature stores (computed once, cached on disk)."""
    from omniret.data.frozen_features import feature_store, media_files

    counts = {}
    for modality, paths in media_files(root).items():
        t0 = time.perf_counter()
        store = feature_store(modality, opts.feature_cache)
        before = store.cache.encoder.calls
        store.preload(paths, progress=opts.progress)
        counts[modality] = {"files": len(paths), "encoded_now": store.cache.encoder.calls - before,
                            "seconds": round(time.perf_counter() - t0, 1)}
        log(f"features: {modality} {len(paths)} files, {counts[modality]['encoded_now']} encoded now, "
            f"{counts[modality]['seconds']}s ({store.cache.folder})")
    return counts


# ---------------------------------------------------------------------------------------------------------
# models and training
# ---------------------------------------------------------------------------------------------------------
def build_model(opts: RealDemoOptions):
    from omniret.config import BackboneConfig, preset
    from omniret.model.omniret import OmniRet

    overrides = dict(opts.model_overrides)
    overrides.setdefault("pooling", opts.pooling)
    cfg = preset("real", seed=opts.seed, **overrides)
    if opts.feature_cache:
        cfg = cfg.replace(image_encoder=BackboneConfig(kind=cfg.image_encoder.kind, path=opts.feature_cache),
                          audio_encoder=BackboneConfig(kind=cfg.audio_encoder.kind, path=opts.feature_cache))
    model = OmniRet.from_config(cfg)
    # the first stage's trainable parameters (the Trainer sets each stage up again): stage 2 adds LoRA
    model.setup_stage(1 if opts.stage1_steps else 2)
    return model


def task_counts(opts: RealDemoOptions, composed: bool = True) -> dict:
    """{task key: training pairs per step}; composed=False: the single-modality tasks only (stage 1)."""
    from omniret.data.mbeir_train import task_key
    from omniret.data.real_benchmark import COMPOSED_TASKS, TASKS

    counts: dict = {}
    for name, (_, _, qmod, cmod, _) in TASKS.items():
        if name in COMPOSED_TASKS and not composed:
            continue
        key = task_key(qmod, cmod)
        counts[key] = counts.get(key, 0) + (opts.per_composed_task if name in COMPOSED_TASKS else opts.per_task)
    return counts


def train_config(opts: RealDemoOptions, output_dir: str | None) -> dict:
    """OmniRet's recipe as a Trainer config (TrainConfig fields; configs/real.yaml says the same for `omniret
    train`): `opts.steps` steps of fixed pairs per task, AdamW (LoRA and the projectors' biases at their own rates;
    the projectors' matrices on Muon at `opts.projector_muon_lr`, the resamplers' at `opts.muon_lr`), linear
    warm-up and cosine decay to 2%, gradient norm clipped at 5; negatives are the batch's candidates of the target's
    modality, as in evaluation."""
    if not 0 <= opts.stage1_steps < opts.steps:
        raise ValueError(f"stage1_steps must be in [0, steps), got {opts.stage1_steps} of {opts.steps}")
    stages = []
    if opts.stage1_steps:
        stages.append({"stage": 1, "name": "warmup", "steps": opts.stage1_steps, "lr": opts.stage1_lr,
                       "task_counts": task_counts(opts, composed=False),
                       "warmup_steps": _warmup_steps(opts, opts.stage1_steps)})
    steps = opts.steps - opts.stage1_steps
    stages.append({"stage": 2, "name": "contrastive", "steps": steps, "lr": opts.lr, "task_counts": task_counts(opts),
                   "warmup_steps": _warmup_steps(opts, steps)})
    groups = [{"match": ["lora_"], "lr": opts.lora_lr}]
    if opts.projector_muon_lr > 0:  # the projectors' matrices; their biases go on to the next group
        groups.append({"match": ["projectors."], "lr": opts.projector_muon_lr, "optimizer": "muon"})
    groups.append({"match": ["projectors."], "lr": opts.projector_lr})
    if opts.muon_lr > 0:
        groups.append({"match": list(MUON_MODULES), "lr": opts.muon_lr, "optimizer": "muon"})
    return {"stages": stages, "param_groups": groups, "triplet": opts.triplet,
            "symmetric": opts.symmetric, "beta": opts.beta, "learnable_temperature": opts.learnable_temperature,
            "mu1": opts.mu1, "mu2": opts.mu2, **_shared_settings(opts, output_dir)}


def _warmup_steps(opts: RealDemoOptions, steps: int) -> int:
    """A stage's linear warm-up: `opts.warmup` of its steps, at least one."""
    return max(1, int(round(opts.warmup * steps)))


def _shared_settings(opts: RealDemoOptions, output_dir: str | None) -> dict:
    """What OmniRet and the baseline train with alike (besides steps and batches)."""
    return {"chunk_size": opts.chunk_size, "keep_graphs": opts.keep_graphs, "negatives": "modality",
            "max_grad_norm": 5.0, "min_lr_ratio": 0.02, "weight_decay": 0.01, "seed": opts.seed,
            "output_dir": output_dir, "resume": opts.resume, "tensorboard": False, "progress_bar": opts.progress,
            "checkpoint_every": opts.checkpoint_every}


def baseline_train_config(opts: RealDemoOptions, output_dir: str | None):
    """The dual encoder's TrainConfig: the same steps, batches (pairs per task), negatives, schedule shape and
    clipping as OmniRet's; its own loss (symmetric InfoNCE, learnable temperature) and learning rate
    (omniret.baselines.dual_encoder.dual_encoder_train_config)."""
    from omniret.baselines.dual_encoder import dual_encoder_train_config

    settings = _shared_settings(opts, output_dir)
    for key in ("chunk_size", "keep_graphs"):  # the baseline's whole batch is one chunk (its heads are small)
        settings.pop(key)
    return dual_encoder_train_config(opts.steps, task_counts=task_counts(opts), lr=opts.baseline_lr,
                                     warmup_steps=_warmup_steps(opts, opts.steps), **settings)


def train_set(root: str, opts: RealDemoOptions):
    from omniret.data.mbeir_train import MBEIRTrainSet

    return MBEIRTrainSet(root, split="train", seed=opts.seed, hard_negatives=opts.hard_negatives, use_global=True)


def train(model, data, opts: RealDemoOptions, output_dir: str | None, *, baseline: bool = False, log=print):
    from omniret.train.trainer import TrainConfig, Trainer

    if output_dir is not None and not opts.resume:  # a fresh run continues no checkpoint of an earlier one
        shutil.rmtree(output_dir, ignore_errors=True)
    config = (baseline_train_config(opts, output_dir) if baseline
              else TrainConfig.from_dict(train_config(opts, output_dir)))
    result = Trainer(model, config).fit(data, time_budget_s=opts.time_budget)
    log(f"{'dual encoder' if baseline else 'omniret'}: {result.steps} steps ({result.samples} pairs); "
        f"stopped: {result.stopped}")
    return result


def build_baseline(opts: RealDemoOptions):
    from omniret.baselines.dual_encoder import DualEncoder, DualEncoderConfig
    from omniret.baselines.frozen_inputs import CachedMediaFeatures

    from omniret.config import preset

    # the frozen features OmniRet reads: standardised per channel when its preset (and overrides) say so
    standardize = opts.model_overrides.get("standardize_media", preset("real").standardize_media)
    return DualEncoder(DualEncoderConfig(standardize_media=standardize, fusion=opts.baseline_fusion),
                       media_features=CachedMediaFeatures(opts.feature_cache), seed=opts.seed)


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
def split_tasks(root: str, split: str, seed: int, use_global: bool = False) -> tuple:
    """(tasks, pools) of one split of the benchmark at `root`, as `omniret eval` reads them, scored at R@1/5/10
    with R@5 the primary; `use_global`: against the union pool (the training split has no local pools)."""
    from omniret.commands.eval import build_tasks
    from omniret.data import mbeir

    problems, (loaded, pools, table) = mbeir.validate(root, split, use_global=use_global)
    if problems:
        raise ValueError(f"real benchmark {split} split: {mbeir.format_report(problems)}")
    tasks, pool_objs = build_tasks(loaded, pools, table, seed)
    for task in tasks:
        task.ks, task.primary_k = (1, 5, 10), 5
    return tasks, pool_objs


def eval_tasks(root: str, opts: RealDemoOptions) -> tuple:
    """Every task's test queries against its local pool (its test gallery), as `omniret eval` reads them."""
    tasks, pool_objs = split_tasks(root, "test", opts.seed)
    for task in tasks:
        if opts.max_eval_queries is not None and len(task.queries) > opts.max_eval_queries:
            keep = opts.max_eval_queries
            task.queries, task.relevant = task.queries[:keep], task.relevant[:keep]
    return tasks, pool_objs


def run_options(run: str, tool: str) -> RealDemoOptions:
    """The options `omniret demo --output run` ran with, from its results.json: every field it saved (one added
    since takes its default), so a tool that reads the run back finds its benchmark root, feature cache and subset
    (`--data-dir`, `--feature-cache`, `--max-items`) and builds its models as the run built them. `tool` names the
    caller in the error for a run without them."""
    path = os.path.join(run, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)["info"]["options"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{tool}: needs the run's options in {path} (run `omniret demo` first): {exc}") from exc
    known = {f.name for f in fields(RealDemoOptions)}
    return RealDemoOptions(**{**{k: v for k, v in saved.items() if k in known}, "output": run, "progress": False})


def load_run_models(run: str, tool: str, feature_cache: str | None = None) -> dict:
    """{"omniret": model, "dual_encoder": model} saved by `omniret demo --output run` (model/, baseline_model/),
    in eval mode; `tool` names the caller in the error for a run without them. `feature_cache`: the run's
    (`run_options(run).feature_cache`): OmniRet's saved config names its cache, the dual encoder's does not (its
    media features are injected), so without it the dual encoder would read and fill the default cache."""
    from omniret.baselines.dual_encoder import DualEncoder
    from omniret.baselines.frozen_inputs import CachedMediaFeatures
    from omniret.model.omniret import OmniRet

    paths = {"omniret": os.path.join(run, "model"), "dual_encoder": os.path.join(run, "baseline_model")}
    missing = [path for path in paths.values() if not os.path.isdir(path)]
    if missing:
        raise SystemExit(f"{tool}: no saved model at {', '.join(missing)} (run `omniret demo` first)")
    models = {"omniret": OmniRet.from_pretrained(paths["omniret"]),
              "dual_encoder": DualEncoder.from_pretrained(paths["dual_encoder"],
                                                          media_features=CachedMediaFeatures(feature_cache))}
    for model in models.values():
        model.eval()
    return models


def evaluate_model(model, tasks, pools, opts: RealDemoOptions, log=print) -> Results:
    enc_q = lambda items: model.encode_queries(items, batch_size=opts.eval_batch_size)  # noqa: E731
    enc_c = lambda items: model.encode_corpus(items, batch_size=opts.eval_batch_size)  # noqa: E731
    return evaluate(tasks, pools, enc_q, enc_c, log=log)


def compare(ours: Results, baseline: Results | None) -> dict:
    """The issue's goal, task group by task group, from R@5."""
    from omniret.data.real_benchmark import COMPOSED_TASKS

    if baseline is None:
        return {}
    out = {}
    for group, names in (("composed", [t for t in ours.tasks if _task_name(t) in COMPOSED_TASKS]),
                         ("single", [t for t in ours.tasks if _task_name(t) not in COMPOSED_TASKS])):
        if not names:
            continue
        mean_ours = sum(ours.tasks[t]["R@5"] for t in names) / len(names)
        mean_base = sum(baseline.tasks[t]["R@5"] for t in names) / len(names)
        need = COMPOSED_MARGIN if group == "composed" else -SINGLE_TOLERANCE
        out[group] = {"tasks": names, "omniret_R@5": mean_ours, "dual_encoder_R@5": mean_base,
                      "difference": mean_ours - mean_base, "needed": need, "met": mean_ours - mean_base >= need}
    return out


def _task_name(task: str) -> str:
    """`omniret eval`'s task names are the query files' stems (mbeir_<name>_test)."""
    name = task[len("mbeir_"):] if task.startswith("mbeir_") else task
    return name[: -len("_test")] if name.endswith("_test") else name


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def plot(ours: Results, baseline: Results | None, history: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(ours.tasks)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(names))
    width = 0.38
    axes[0].bar(x - width / 2, [ours.tasks[t]["R@5"] for t in names], width, label="OmniRet (real preset)")
    if baseline is not None:
        axes[0].bar(x + width / 2, [baseline.tasks[t]["R@5"] for t in names], width, label="dual encoder (CLIP-style)")
    axes[0].set_xticks(x, [_task_name(t).replace("_", "\n", 1) for t in names], fontsize=7)
    axes[0].set_ylabel("Recall@5 (test)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    axes[0].set_title("test Recall@5 per task")
    if history:
        steps = [h["step"] for h in history]
        for key in ("loss", "contrastive", "triplet"):
            axes[1].plot(steps, [h[key] for h in history], label=key, lw=1)
        axes[1].set_xlabel("step")
        axes[1].set_yscale("log")
        axes[1].legend(fontsize=8)
        axes[1].set_title("OmniRet training loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def print_table(ours: Results, baseline: Results | None, log=print) -> None:
    log(f"{'task':<24} {'R@1':>6} {'R@5':>6} {'R@10':>6}   {'dual encoder R@5':>16}  queries (gallery)")
    for task, m in ours.tasks.items():
        d = ours.details[task]
        base = f"{100 * baseline.tasks[task]['R@5']:16.1f}" if baseline is not None else " " * 16
        log(f"{_task_name(task):<24} {100 * m['R@1']:6.1f} {100 * m['R@5']:6.1f} {100 * m['R@10']:6.1f}   {base}  "
            f"{d['queries']} ({d['candidates']})")


def results_markdown(ours: Results, baseline: Results | None, info: dict) -> str:
    lines = ["# Real-media benchmark: test split", "",
             "| task | R@1 | R@5 | R@10 | dual encoder R@1 | R@5 | R@10 | queries | gallery |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, m in ours.tasks.items():
        b = baseline.tasks[task] if baseline is not None else None
        base = " | ".join(f"{100 * b[k]:.1f}" for k in ("R@1", "R@5", "R@10")) if b else "- | - | -"
        d = ours.details[task]
        lines.append(f"| {_task_name(task)} | {100 * m['R@1']:.1f} | {100 * m['R@5']:.1f} | {100 * m['R@10']:.1f} | "
                     f"{base} | {d['queries']} | {d['candidates']} |")
    for group, c in info.get("goals", {}).items():
        lines.append("")
        lines.append(f"- {group} tasks: OmniRet mean R@5 {100 * c['omniret_R@5']:.1f}, dual encoder "
                     f"{100 * c['dual_encoder_R@5']:.1f}, difference {100 * c['difference']:+.1f} points "
                     f"(goal {100 * c['needed']:+.0f}): {'met' if c['met'] else 'not met'}")
    if info.get("stopped", "done") != "done":
        lines += ["", f"**Training was cut short by the time budget: {info['steps']} of {info['steps_planned']} "
                      "steps.** These numbers are not the seeded run's result."]
    lines += ["", "![results](results.png)", "", "```json", json.dumps(info, indent=2, default=str), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# index and search
# ---------------------------------------------------------------------------------------------------------
def build_gallery_index(ours: Results, pools: dict, model_dir: str, fingerprint: str, output: str, log=print) -> dict:
    """One exact index over every distinct image and audio candidate of the test galleries (the media a user
    searches for; the captions and transcripts of the two ->text tasks stay out, or a text query finds texts
    like itself first), from the evaluation's embeddings, with each candidate's media path as metadata."""
    from omniret.eval.index import SearchIndex

    seen, rows, ids, records = set(), [], [], []
    for name, pool in pools.items():
        emb = ours.pool_embeddings.get(name)
        if emb is None:
            continue
        for i, (did, item) in enumerate(zip(pool.ids, pool.items)):
            if did in seen or not any(k in item for k in ("image", "audio")):
                continue
            seen.add(did)
            rows.append(emb[i])
            ids.append(did)
            records.append({k: v for k, v in item.items() if k in ("text", "image", "audio")})
    exact = SearchIndex.build(torch.stack(rows), ids=ids, items=records, kind="flat",
                              model={"path": os.path.abspath(model_dir), "preset": "real", "fingerprint": fingerprint})
    path = os.path.join(output, "index")
    exact.save(path)
    log(f"index: {len(exact)} test images and recordings -> {path}")
    return {"count": len(exact), "dim": exact.dim, "path": path}


def example_search(model, index_path: str, tasks: list, k: int = 5, log=print) -> dict:
    """`omniret search` on one real test query (the first text query of the drawing task), as a user runs it."""
    from omniret.eval.index import SearchIndex

    task = next((t for t in tasks if "openclipart" in t.name), tasks[0])
    query = task.queries[0]
    index = SearchIndex.load(index_path)
    scores, rows = index.search(model.encode_queries([query]), k)
    hits = [{"rank": r + 1, "score": round(float(s), 4), "id": index.ids[i], **index.items[i]}
            for r, (s, i) in enumerate(zip(scores[0], rows[0])) if i >= 0]
    text = query.get("text", "")
    log(f'search: omniret search --index {index_path} --text "{text}"'
        + (f' --instruction "{query["instruction"]}"' if query.get("instruction") else ""))
    for h in hits:
        log(f"  {h['rank']}. {h['score']:.3f} {h['id']} {h.get('image') or h.get('audio') or h.get('text')}")
    return {"query": query, "hits": hits}


# ---------------------------------------------------------------------------------------------------------
def train_and_evaluate(model, data, tasks, pools, opts: RealDemoOptions, output_dir: str | None, *,
                       baseline: bool = False, log=print) -> tuple:
    """Train one model through the Trainer, then evaluate it: (Results, TrainResult, seconds)."""
    t0 = time.perf_counter()
    result = train(model, data, opts, output_dir, baseline=baseline, log=log)
    t1 = time.perf_counter()
    results = evaluate_model(model.eval(), tasks, pools, opts, log=log)
    return results, result, {"train": round(t1 - t0, 1), "eval": round(time.perf_counter() - t1, 1)}


@holds_output_lock
def run_real_demo(opts: RealDemoOptions, log=print) -> dict:
    from omniret.fingerprint import fingerprint_model
    from omniret.demo import start_run

    t0 = time.perf_counter()
    start_run(opts.steps, opts.threads, opts.output, log)
    root = ensure_benchmark(opts, log)
    features = ensure_features(root, opts, log)
    t_data = time.perf_counter() - t0
    data = train_set(root, opts)
    tasks, pools = eval_tasks(root, opts)

    model = build_model(opts)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: real preset, pooling={model.config.pooling}, {n_train / 1e6:.2f}M trainable parameters")
    ours, result, seconds = train_and_evaluate(model, data, tasks, pools, opts, os.path.join(opts.output, "train"),
                                               log=log)
    model_dir = os.path.join(opts.output, "model")
    model.save_pretrained(model_dir)
    metrics = os.path.join(opts.output, "train", "metrics.jsonl")  # every step, also those before a resume
    history = read_jsonl_log(metrics) if os.path.exists(metrics) else result.history

    base = base_result = None
    base_seconds: dict = {}
    if opts.baseline:
        baseline_model = build_baseline(opts)
        base, base_result, base_seconds = train_and_evaluate(
            baseline_model, data, tasks, pools, opts, os.path.join(opts.output, "baseline_train"), baseline=True,
            log=log)
        baseline_model.save_pretrained(os.path.join(opts.output, "baseline_model"))

    index_report = search = None
    if opts.build_index:
        index_report = build_gallery_index(ours, pools, model_dir, fingerprint_model(model), opts.output, log)
        search = example_search(model, index_report["path"], tasks, log=log)
    min_steps = opts.steps // 2 if opts.min_steps is None else opts.min_steps
    runs = [result] + ([base_result] if base_result is not None else [])
    steps_done = min(r.steps for r in runs)  # a time budget may stop either model early
    stopped = next((r.stopped for r in runs if r.steps < opts.steps), "done")
    info = {
        "benchmark": "real", "data_root": root, "features": features, "steps": steps_done,
        "steps_planned": opts.steps, "stopped": stopped, "min_steps": min_steps,
        "too_few_steps": steps_done < min_steps,
        "pairs_seen": result.samples, "trainable_parameters": n_train, "threads": torch.get_num_threads(),
        "final_loss": history[-1]["loss"] if history else None,
        "goals": compare(ours, base),
        "seconds": {"data": round(t_data, 1), "omniret": seconds, "dual_encoder": base_seconds,
                    "total": round(time.perf_counter() - t0, 1)},
        "options": asdict(opts), "index": index_report, "search": search,
    }
    extra = {"info": info}
    if base is not None:
        extra["baselines"] = {"dual_encoder": base.tasks}
    payload = ours.to_json(**extra)
    from omniret.files import atomic_write_json

    atomic_write_json(os.path.join(opts.output, "results.json"), payload, indent=2, default=str)
    plot(ours, base, history, os.path.join(opts.output, "results.png"))
    atomic_write_text(os.path.join(opts.output, "results.md"), results_markdown(ours, base, info))
    print_table(ours, base, log)
    for group, c in info["goals"].items():
        log(f"{group}: OmniRet R@5 {100 * c['omniret_R@5']:.1f} vs dual encoder {100 * c['dual_encoder_R@5']:.1f} "
            f"({100 * c['difference']:+.1f} points; goal {100 * c['needed']:+.0f}): {'met' if c['met'] else 'not met'}")
    return {"results": ours, "baseline": base, "info": info, "history": history}
