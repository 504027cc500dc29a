"""Qwen2.5-VL: vision encoder + Qwen2 decoder with multimodal RoPE, in plain single-device PyTorch.

Files: config.py (config + flavors), rope.py (M-RoPE position ids), vision.py, language.py, model.py,
hf.py (transformers <-> mmkit state dicts), load.py (`load_vlm`), tiny.py (tiny test folders).
"""
