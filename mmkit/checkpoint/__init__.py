"""Checkpoints on disk, below both `mmkit.train` and `mmkit.convert` (which import this, never each other).

- `dcp.py`      the training checkpoint: sharded DCP tensors, `latest`, train_state.json, atomic publish
- `layouts.py`  tensor/pipeline-parallel layouts: split a full state into per-rank pieces and merge back
- `mm.py`       any mmkit checkpoint as one full state (`read_mm`); converted ones written unsplit (DCP) or
                pre-split per rank (MindSpeed style, `layout.json` + `mp_rank_TT_PPP/`) (`write_mm`)
- `hf.py`       Hugging Face folders through each family's HF adapter (`read_hf`, `write_hf`)
- `common.py`   the in-memory checkpoint (`MMCheckpoint`), its checks, the atomic output folder
"""
