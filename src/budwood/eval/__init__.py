"""Evaluation: open, versioned suites for hallucination, reproducibility, bias and the domain task.

run.py is the entry point (`budwood eval`); targets.py says what is evaluated; one module per suite.
"""
