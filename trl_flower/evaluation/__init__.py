"""Evaluation: the paper's recommendation metrics and distribution-fitting divergences.

`metrics` and `distribution` need only numpy. Constrained beam search and reports live in their own modules.
"""
