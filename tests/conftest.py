import sys
from pathlib import Path

# tests share small helper modules (tests/*_helpers.py)
sys.path.insert(0, str(Path(__file__).parent))
