import sys
from pathlib import Path

# tests share small helper modules (tests/*_helpers.py)
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def wan_train_root(tmp_path_factory):
    """A tiny Wan2.1 t2v folder (`wan/`) and 8 synthetic shape clips (`shapes/data.txt`), shared
    read-only by the training tests (each writes its checkpoints under its own tmp_path)."""
    from mmkit.data.synth import synth_shapes
    from mmkit.models.wan.tiny import create_tiny_wan

    root = tmp_path_factory.mktemp("wan_train_root")
    create_tiny_wan(root / "wan", task="t2v", seed=0, vae="random")
    synth_shapes(root / "shapes", videos=8, num_frames=9, height=32, width=32, seed=0, progress=False)
    return root
