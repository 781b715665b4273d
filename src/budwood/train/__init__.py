"""Training: the LoRA recipe and what it is made of.

recipe.py (read first: setup -> train -> checkpoint -> finish) · state.py (RunState, StopReason) ·
distributed.py (Strategy: Single, DDP, FSDP) · loss.py (Objective: SFT) · data.py · checkpoint.py ·
metrics.py · outputs.py
"""
