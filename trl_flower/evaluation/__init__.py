"""Evaluation: the paper's recommendation metrics and distribution-fitting divergences.

`metrics` and `distribution` need only numpy. Constrained beam search and reports live in their own modules;
`pipeline` is the whole evaluation of a saved run (`trl-flower evaluate`'s library call, `run_evaluation`).
"""
