"""The package has one optimizer loop, the Trainer's (issue 19): no module under omniret/ but
omniret/train/trainer.py steps an optimizer or a learning-rate schedule, and none but omniret/train/optim.py
builds a torch optimizer. A new training loop elsewhere fails here; it belongs in a Trainer objective
(omniret/train/objectives.py)."""
import ast
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPPER = os.path.join("omniret", "train", "trainer.py")
BUILDER = os.path.join("omniret", "train", "optim.py")
OPTIMIZERS = {name for name in dir(torch.optim) if isinstance(getattr(torch.optim, name), type)
              and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)}


def optimizer_uses(source: str) -> tuple[list, list]:
    """(lines of `x.step()` calls with no argument or only a closure: an optimizer's or a schedule's step, not
    GradCache.step(queries, candidates); lines that construct a torch.optim optimizer, as `torch.optim.AdamW(...)`,
    `optim.SGD(...)` or a bare `AdamW(...)`)."""
    steps, builds = [], []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "step" and not node.args and \
                all(k.arg == "closure" for k in node.keywords):
            steps.append(node.lineno)
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in OPTIMIZERS:
            builds.append(node.lineno)
    return steps, builds


def test_the_checker_finds_a_loop():
    loop = ("opt = torch.optim.AdamW(model.parameters(), lr=1e-3)\n"
            "for x in data:\n    model(x).sum().backward()\n    opt.step()\n    sched.step()\n"
            "gc.step(queries, candidates)\nsgd = SGD(params)\n")
    assert optimizer_uses(loop) == ([4, 5], [1, 7])
    assert "AdamW" in OPTIMIZERS and "SGD" in OPTIMIZERS


def test_only_the_trainer_steps_an_optimizer():
    stepping, building = {}, {}
    for folder, _, files in os.walk(os.path.join(ROOT, "omniret")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            with open(path, encoding="utf-8") as f:
                steps, builds = optimizer_uses(f.read())
            if steps and rel != STEPPER:
                stepping[rel] = steps
            if builds and rel != BUILDER:
                building[rel] = builds
    assert stepping == {}, f"optimizer or schedule steps outside the Trainer's loop: {stepping}"
    assert building == {}, f"torch optimizers built outside omniret/train/optim.py: {building}"
    with open(os.path.join(ROOT, STEPPER), encoding="utf-8") as f:
        assert optimizer_uses(f.read())[0], "the Trainer's own loop was not found: the checker is blind"
