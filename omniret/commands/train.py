"""`omniret train --config FILE`: train from a JSON or YAML config.

    {
      "model": {"preset": "tiny"}                       # or {"pretrained": DIR}, or
               | {"factory": "pkg.module:function", "kwargs": {...}},
      "data":  {"mbeir": DIR[, "split": "train", "tasks": [task file names], "hard_negatives": 0,
                "seed": 0, "check_files": true, "global_pool": false]}            # M-BEIR-format files (omniret.data.mbeir_train)
               | {"factory": "pkg.module:function", "kwargs": {...}},   # returns the training dataset
      "train": {...TrainConfig fields, "stages": [{"stage": 1, "steps": 100, "batch_size": 64}, ...]},
      "save_to": DIR                                     # optional: model.save_pretrained(DIR) at the end
    }
A `factory` is code by design: `omniret train` imports the named module and calls the function, so a config is
as trusted as a script; train only from config files you wrote or checked (model directories and checkpoints, in
contrast, never run code).
Relative paths in the config are relative to the config file. M-BEIR data is read and checked completely (missing
media, unknown candidate ids, queries without a positive, missing instructions) before the model is built. Under
`torchrun` (WORLD_SIZE > 1) the process
group is initialised here (nccl on GPUs, gloo on CPU) and rank 0 writes the checkpoints and metrics;
`--strategy fsdp` shards the model with FSDP2 instead of replicating it (DDP).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from omniret.threads import passive_openmp

# before anything imports torch: OpenMP threads that wait sleep instead of spinning (omniret/threads.py says why)
passive_openmp()


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="JSON or YAML file (model, data, train, save_to)")
    parser.add_argument("--output-dir", default=None, help="override train.output_dir")
    parser.add_argument("--time-budget", type=float, default=None, help="stop (with a checkpoint) after this "
                        "many seconds; rerun to resume")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default=None,
                        help="under torchrun: ddp (replicated model, the default) or fsdp (FSDP2: parameters and "
                        "optimizer states sharded over the ranks); overrides train.strategy")


def load_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError("--config: YAML configs need PyYAML (pip install pyyaml); or use JSON") from exc
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config: {path} is not valid YAML ({' '.join(str(exc).split())})") from None
    else:
        try:
            cfg = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--config: {path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--config: {path} must hold a mapping at the top level")
    unknown = set(cfg) - {"model", "data", "train", "save_to"}
    if unknown:
        raise ValueError(f"--config: unknown top-level keys {sorted(unknown)}")
    return cfg


def _call_factory(spec: dict, what: str):
    target = spec.get("factory")
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"{what}.factory must be 'package.module:function', got {target!r}")
    module, _, name = target.partition(":")
    # code by design: the user's own config file names the function that builds their model or data
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # the factory's module exists but fails to import: its own traceback says why
        raise ValueError(f"{what}.factory: no module named {exc.name!r} (is it installed, or on PYTHONPATH?)") from None
    fn = getattr(imported, name, None)
    if fn is None:
        raise ValueError(f"{what}.factory: {module} has no {name}")
    return fn(**spec.get("kwargs", {}))


def build_model(spec: dict, base: Path):
    if "factory" in spec:
        return _call_factory(spec, "model")
    from omniret.model import OmniRet  # the real model; imported only when asked for
    if "pretrained" in spec:
        return OmniRet.from_pretrained(base / spec["pretrained"], **spec.get("overrides", {}))
    if "preset" in spec:
        from omniret.config import preset
        return OmniRet.from_config(preset(spec["preset"], **spec.get("overrides", {})))
    raise ValueError("model: give one of preset, pretrained or factory")


MBEIR_KEYS = {"mbeir", "split", "tasks", "hard_negatives", "seed", "check_files", "global_pool"}


def build_data(spec: dict, base: Path, seed: int):
    """The data section -> the training data set: M-BEIR-format files ({"mbeir": DIR, ...}) or a factory."""
    if not isinstance(spec, dict):
        raise ValueError(f"data must be a mapping, got {spec!r}")
    if "mbeir" in spec:
        unknown = set(spec) - MBEIR_KEYS
        if unknown:
            raise ValueError(f"data: unknown keys {sorted(unknown)} (M-BEIR data takes {sorted(MBEIR_KEYS)})")
        from omniret.data.mbeir_train import MBEIRTrainSet
        root = base / str(spec["mbeir"])
        if not root.is_dir():
            raise ValueError(f"data.mbeir: no such directory {root}")
        return MBEIRTrainSet(str(root), split=spec.get("split", "train"), tasks=spec.get("tasks"),
                             seed=int(spec.get("seed", seed)), hard_negatives=int(spec.get("hard_negatives", 0)),
                             check_files=bool(spec.get("check_files", True)),
                             use_global=bool(spec.get("global_pool", False)))
    if "factory" in spec:
        return _call_factory(spec, "data")
    raise ValueError("data: give mbeir (a directory of M-BEIR-format files) or factory")


def _init_distributed() -> bool:
    """Initialise the process group under torchrun; returns whether this call did (and so must destroy it)."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        return True
    return False


def run(args) -> int:
    cfg = load_config(args.config)
    base = Path(args.config).resolve().parent
    from omniret.train.trainer import TrainConfig
    train = dict(cfg.get("train", {}))
    if args.output_dir is not None:
        train["output_dir"] = args.output_dir
    if train.get("output_dir"):
        train["output_dir"] = str(base / train["output_dir"])
    if args.no_progress:
        train["progress_bar"] = False
    if getattr(args, "strategy", None) is not None:
        train["strategy"] = args.strategy
    train_cfg = TrainConfig.from_dict(train)
    own_group = _init_distributed()
    try:
        return _train(cfg, base, train_cfg, args)
    finally:
        if own_group:  # a process that exits with its group alive can abort in gloo's threads at exit
            from omniret.train.distributed import leave_process_group
            leave_process_group()


def _train(cfg, base: Path, train_cfg, args) -> int:
    from omniret.train.trainer import Trainer
    if "data" not in cfg:
        raise ValueError("--config: a 'data' section is required")
    dataset = build_data(cfg["data"], base, train_cfg.seed)
    import torch
    torch.manual_seed(train_cfg.seed)  # the model's random parts (LoRA, resamplers) are the seed's
    model = build_model(cfg.get("model", {}), base)
    trainer = Trainer(model, train_cfg)
    result = trainer.fit(dataset, time_budget_s=args.time_budget)
    rank = int(os.environ.get("RANK", "0"))
    full_state = None
    if trainer.sharded and cfg.get("save_to") and result.stopped == "done":
        from omniret.train.distributed import full_state_dict
        full_state, _ = full_state_dict(model)  # every rank takes part; rank 0 gets the tensors
    if rank == 0:
        last = result.history[-1] if result.history else {}
        print(json.dumps({"steps": result.steps, "samples": result.samples, "stopped": result.stopped,
                          "loss": last.get("loss"), "checkpoint": result.last_checkpoint}))
        if cfg.get("save_to") and result.stopped == "done":
            if not hasattr(model, "save_pretrained"):
                print("save_to: this model has no save_pretrained; skipped", file=sys.stderr)
            elif full_state is not None:  # sharded: save a fresh replica holding the gathered weights
                replica = build_model(cfg.get("model", {}), base)
                if hasattr(replica, "setup_stage"):
                    replica.setup_stage(train_cfg.stages[-1].stage)
                replica.load_state_dict(full_state)
                replica.save_pretrained(base / cfg["save_to"])
            else:
                model.save_pretrained(base / cfg["save_to"])
    return 0
