"""`python -m mmkit.train --config ...` (the torchrun entry point): same as `mmkit train`."""

import sys

from mmkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
