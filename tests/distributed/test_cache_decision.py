"""The adaptive cache's skip decision under several processes: every rank takes the same decision
(the signal is all-reduced through the process group handed to `decide`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("_cache_decision_worker.py")


def test_two_ranks_take_the_same_decision():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29655", str(WORKER),
    ]  # fmt: skip
    repo = str(WORKER.parents[2])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)  # a hang fails fast
    assert res.returncode == 0, res.stderr[-4000:]
    got = {
        (m[0], int(m[1])): (int(m[2]), int(m[3]), float(m[4]))
        for m in re.findall(r"DECISION (\w+) rank=(\d) local=(\d) skip=(\d) signal=([\d.]+)", res.stdout)
    }
    assert len(got) == 6, res.stdout
    assert got[("split", 0)][0] == 1 and got[("split", 1)][0] == 0  # alone they would disagree
    for name, skip in (("split", 0), ("both_low", 1), ("both_high", 0)):
        assert got[(name, 0)][1:] == got[(name, 1)][1:]  # same decision, same signal on both ranks
        assert got[(name, 0)][1] == skip
