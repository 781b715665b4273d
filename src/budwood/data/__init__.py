"""Data: JSONL in four forms -> canonical conversations -> token ids with loss masks -> batches."""
