"""How spread out OmniRet's items are at each stage of the model, before and after a few training steps.

    python -m omniret.demo.real_spread --steps 20 --lr 1e-3 --muon-lr 0 --json out/spread.json
    python -m omniret.demo.real_spread --model out/demo/model --items 300    # a trained model against its start
    python -m omniret.demo.real_spread --model a/model b/model --items 300 --plot out/ranks.png

For 48 test items of each kind (images, audio clips, texts, texts with their instruction) it prints, per stage, the
mean pairwise cosine across items and their effective rank: the projector's output (mean over an item's tokens), the
media resampler's output, the LLM's input and output (mean over the valid positions), and the embedding. A cosine of
1.0 means every item looks the same at that stage (a collapse); the frozen features after standardisation sit near 0.
The effective rank (`effective_rank`) counts the directions the items spread along: a dimensional collapse lowers it
while the cosine may stay moderate. It is at most the number of items less one.

docs/real_benchmark.md reads it twice. "Learning rates per module, and the collapse": with every new module at 1e-3
the embeddings collapse within a few steps on AdamW (`--muon-lr 0`), with the text's LLM output still spread; the
resamplers' matrices on Muon do not. "Underfitting, and a dimensional collapse in the projectors": on AdamW the
projectors' output loses most of its effective rank; their matrices on Muon (the default) keep more of it.
"""
from __future__ import annotations

import argparse

import torch

from omniret.files import atomic_path, atomic_write_json

__all__ = ["mean_pairwise_cosine", "effective_rank", "stage_vectors", "stage_spread", "stage_summary", "plot_ranks",
           "main"]

STAGES = ("projected", "resampled", "llm_input", "llm_output", "embedding")


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of rows of x (n, ...) flattened per row, n >= 2."""
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 items, got {x.shape[0]}")
    u = torch.nn.functional.normalize(x.reshape(x.shape[0], -1).double(), dim=1)
    n = u.shape[0]
    total = (u.sum(0) ** 2).sum() - n  # sum over i != j of <u_i, u_j>
    return float(total / (n * (n - 1)))


def effective_rank(x: torch.Tensor) -> float:
    """The participation ratio (sum s^2)^2 / sum s^4 of the singular values s of the rows of x (n, ...) flattened
    and centred: k for items spread evenly along k orthogonal directions, 1 when they differ along one only, 0
    when they are all equal. n >= 2."""
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 items, got {x.shape[0]}")
    flat = x.reshape(x.shape[0], -1).double()
    power = torch.linalg.svdvals(flat - flat.mean(dim=0)) ** 2
    total = power.sum()
    return float(total ** 2 / (power ** 2).sum()) if total > 0 else 0.0


@torch.no_grad()
def stage_vectors(model, items: list) -> dict:
    """{stage: (n, ...) per-item tensor} for one call of the model over `items` (eval mode): the projector's output
    averaged over each item's tokens and the media resampler's output (when the items carry media of one modality;
    the second only with one shared resampler), the LLM's input and output averaged over each item's valid
    positions, and the embedding."""
    seen: dict = {}
    llm = model.composer.llm
    projected = []
    resample_media = model.resample_media

    def record_projected(modality, tokens, cu):  # the projected tokens of one modality, packed by cu_seqlens
        projected.append((tokens, cu))
        return resample_media(modality, tokens, cu)

    def composer_call(module, inputs, output):  # (inputs_embeds, mask) -> hidden; the mask leaves the padding out
        seen.setdefault("llm_input", inputs[0])
        seen.update(llm_output=output, mask=inputs[1])

    hooks = [model.composer.register_forward_hook(composer_call)]
    if hasattr(llm, "embeddings"):  # BERT-like LLMs: the LLM's input after its embedding LayerNorm instead
        hooks.append(llm.embeddings.register_forward_hook(lambda m, i, o: seen.__setitem__("llm_input", o)))
    if isinstance(model.media_resampler, torch.nn.Module) and not isinstance(model.media_resampler, torch.nn.ModuleDict):
        hooks.append(model.media_resampler.register_forward_hook(lambda m, i, o: seen.__setitem__("resampled", o)))
    was_training = model.training
    model.eval()
    model.resample_media = record_projected
    try:
        emb, _ = model(items)
    finally:
        del model.resample_media  # the class's method again
        model.train(was_training)
        for h in hooks:
            h.remove()
    if len(projected) == 1:
        tokens, cu = projected[0]
        bounds = cu.tolist()
        seen["projected"] = torch.stack([tokens[bounds[i]:bounds[i + 1]].mean(dim=0) for i in range(len(bounds) - 1)])
    keep = seen.pop("mask").to(emb.dtype).unsqueeze(-1)
    for key in ("llm_input", "llm_output"):
        seen[key] = (seen[key] * keep).sum(dim=1) / keep.sum(dim=1)
    seen["embedding"] = emb
    return {k: seen[k] for k in STAGES if k in seen}


def stage_spread(model, items: list) -> dict:
    """{stage: mean pairwise cosine across `items`} of `stage_vectors`."""
    return {k: round(mean_pairwise_cosine(v), 4) for k, v in stage_vectors(model, items).items()}


def stage_summary(model, items: list) -> dict:
    """{stage: {"cosine": mean pairwise cosine, "rank": effective rank}} across `items`, from one call."""
    return {k: {"cosine": round(mean_pairwise_cosine(v), 4), "rank": round(effective_rank(v), 2)}
            for k, v in stage_vectors(model, items).items()}


def plot_ranks(series: dict, path: str) -> None:
    """One panel per kind of item: the effective rank at each stage, one line per entry of `series`
    ({label: {kind: stage_summary}}); stages a kind does not have are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(next(iter(series.values())))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        stages = [st for st in STAGES if st in next(iter(series.values()))[kind]]
        for label, report in series.items():
            ax.plot(range(len(stages)), [report[kind][st]["rank"] for st in stages], marker="o", label=label)
        ax.set_xticks(range(len(stages)), [st.replace("_", "\n") for st in stages], fontsize=7)
        ax.set_title(kind, fontsize=9)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("effective rank across items")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _probe_items(tasks, per_kind: int) -> dict:
    by_name = {t.name: t for t in tasks}
    texts = by_name["openclipart_text2image"].queries[:per_kind]
    return {
        "image": [{"image": q["image"]} for q in by_name["tuxpaint_image2text"].queries[:per_kind]],
        "audio": [{"audio": q["audio"]} for q in by_name["asterisk_audio2text"].queries[:per_kind]],
        "text": [{"text": q["text"]} for q in texts],
        "text+instruction": [{"text": q["text"], "instruction": q["instruction"]} for q in texts],
    }


def main(argv=None) -> dict:
    from omniret.demo import real_demo
    from omniret.threads import apply_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps (their own warm-up and cosine schedule)")
    p.add_argument("--model", nargs="+", default=None,
                   help="trained OmniRet folders (e.g. an `omniret demo` run's model/), measured instead of training "
                        "--steps; 'before' is the preset at its start with the first model's seed")
    p.add_argument("--lr", type=float, default=1e-4, help="the rate of the resamplers' latents and norms and ASWP (of their matrices too with --muon-lr 0)")
    p.add_argument("--projector-lr", type=float, default=None, help="the projectors' rate (default: the demo's)")
    p.add_argument("--projector-muon-lr", type=float, default=None,
                   help="the projectors' matrices on Muon at this rate (default: the demo's; 0: AdamW at the projectors' rate)")
    p.add_argument("--muon-lr", type=float, default=None,
                   help="the resamplers' matrices on Muon at this rate (default: the demo's; 0: AdamW at --lr)")
    p.add_argument("--pooling", default="aswp", choices=("aswp", "eos", "mean"), help="the embedding's pooling")
    p.add_argument("--items", type=int, default=48, help="test items of each kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-items", type=int, default=None, help="a seeded subset of the benchmark (quick runs)")
    p.add_argument("--data-dir", default=None, help="the benchmark's root, as `omniret demo --data-dir` (default: "
                                                    "the cache folder named by its configuration)")
    p.add_argument("--feature-cache", default=None, help="the frozen features, as `omniret demo --feature-cache`")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--plot", default=None, help="draw the effective rank per stage here (a .png)")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    extra = {} if args.projector_lr is None else {"projector_lr": args.projector_lr}
    if args.muon_lr is not None:
        extra["muon_lr"] = args.muon_lr
    if args.projector_muon_lr is not None:
        extra["projector_muon_lr"] = args.projector_muon_lr
    opts = real_demo.RealDemoOptions(output="", steps=max(args.steps, 1), lr=args.lr, seed=args.seed,
                                     pooling=args.pooling,
                                     max_items=args.max_items, data_dir=args.data_dir,
                                     feature_cache=args.feature_cache, progress=False, checkpoint_every=0,
                                     baseline=False, **extra)
    trained = {}
    if args.model:
        from omniret.model.omniret import OmniRet

        trained = {path: OmniRet.from_pretrained(path) for path in args.model}
        first = trained[args.model[0]].config
        opts.seed, opts.pooling = first.seed, first.pooling
    root = real_demo.ensure_benchmark(opts)
    real_demo.ensure_features(root, opts)
    tasks, _ = real_demo.eval_tasks(root, opts)
    items = _probe_items(tasks, args.items)
    model = real_demo.build_model(opts)
    data = real_demo.train_set(root, opts)
    model.before_training(data)
    report = {"options": {k: v for k, v in vars(args).items() if k != "json"},
              "before": {kind: stage_summary(model, xs) for kind, xs in items.items()}}
    if trained:
        report["models"] = {path: {kind: stage_summary(m, xs) for kind, xs in items.items()}
                            for path, m in trained.items()}
        report["after"] = report["models"][args.model[0]]
    elif args.steps:
        real_demo.train(model, data, opts, None, log=lambda *a: None)
        report["after"] = {kind: stage_summary(model, xs) for kind, xs in items.items()}
    series = {"before": report["before"], **(report.get("models") or {"after": report.get("after", {})})}
    series = {label: rows for label, rows in series.items() if rows}
    for label, rows in series.items():
        for kind, row in rows.items():
            print(f"{label} {kind} ({len(items[kind])} items): "
                  + "  ".join(f"{k} {v['cosine']:.3f} / {v['rank']:.1f}" for k, v in row.items()))
    print("(each stage: mean pairwise cosine / effective rank)")
    if args.plot:
        plot_ranks(series, args.plot)
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
