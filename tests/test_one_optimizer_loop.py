"""The package has one optimizer loop, the Trainer's (issue 19): no module under omniret/ but
omniret/train/trainer.py steps an optimizer or a learning-rate schedule, and none but omniret/train/optim.py
builds a torch optimizer. A new training loop elsewhere fails here; it belongs in a Trainer objective
(omniret/train/objectives.py). One delegation is allowed: the `step` method of an optimizer class in
omniret/train/optim.py (MultiOptimizer) steps the optimizers it is made of, which is that one loop's step."""
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


def delegating_steps(source: str) -> set:
    """Lines of `x.step()` calls inside the `step` method of a class whose bases name an Optimizer (a composite
    optimizer stepping its parts)."""
    lines = set()
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None) for b in cls.bases}
        if "Optimizer" not in bases:
            continue
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef) and fn.name == "step":
                lines |= {n.lineno for n in ast.walk(fn) if isinstance(n, ast.Call)
                          and isinstance(n.func, ast.Attribute) and n.func.attr == "step" and not n.args}
    return lines


def test_the_checker_finds_a_loop():
    loop = ("opt = torch.optim.AdamW(model.parameters(), lr=1e-3)\n"
            "for x in data:\n    model(x).sum().backward()\n    opt.step()\n    sched.step()\n"
            "gc.step(queries, candidates)\nsgd = SGD(params)\n")
    assert optimizer_uses(loop) == ([4, 5], [1, 7])
    assert "AdamW" in OPTIMIZERS and "SGD" in OPTIMIZERS
    composite = ("class Both(torch.optim.Optimizer):\n    def step(self, closure=None):\n"
                 "        for o in self.parts:\n            o.step()\n"
                 "    def train(self):\n        self.parts[0].step()\n")
    assert sorted(optimizer_uses(composite)[0]) == [4, 6] and delegating_steps(composite) == {4}
    assert delegating_steps(loop) == set()


def test_only_the_trainer_steps_an_optimizer():
    stepping, building = {}, {}
    for folder, _, files in os.walk(os.path.join(ROOT, "omniret")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            with open(path, encoding="utf-8") as f:
                source = f.read()
            steps, builds = optimizer_uses(source)
            if rel == BUILDER:
                steps = [n for n in steps if n not in delegating_steps(source)]
            if steps and rel != STEPPER:
                stepping[rel] = steps
            if builds and rel != BUILDER:
                building[rel] = builds
    assert stepping == {}, f"optimizer or schedule steps outside the Trainer's loop: {stepping}"
    assert building == {}, f"torch optimizers built outside omniret/train/optim.py: {building}"
    with open(os.path.join(ROOT, STEPPER), encoding="utf-8") as f:
        assert optimizer_uses(f.read())[0], "the Trainer's own loop was not found: the checker is blind"
