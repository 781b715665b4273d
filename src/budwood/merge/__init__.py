"""Combining adapters: methods.py (the maths, pure functions), merge.py (`budwood merge`: parents ->
adapter directory or full model), compose.py (`budwood compose`: weights learned from a few examples)."""
