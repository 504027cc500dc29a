"""`python -m mmkit COMMAND ...`, so that `torchrun --nproc_per_node N -m mmkit generate t2v ...` works."""

import sys

from mmkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
