"""Run every benchmark in this folder in turn (`make bench`)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SKIP = {"run_all.py", "common.py"}

if __name__ == "__main__":
    rc = 0
    for script in sorted(HERE.glob("*.py")):
        if script.name in SKIP or script.name.startswith("_"):  # _name.py: helpers, not benchmarks
            continue
        print(f"=== {script.name}", flush=True)
        rc |= subprocess.call([sys.executable, str(script)], cwd=HERE)
    sys.exit(rc)
