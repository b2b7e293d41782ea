"""Datasets: the Amazon splits loader, raw Amazon 2018 preparation, prompts and item popularity.

Names are exported lazily (PEP 562) so that ``import trl_flower.data.prompts`` does not import `datasets`.
"""

from trl_flower._lazy import lazy_exports

_LAZY = {
    "AmazonData": "trl_flower.data.amazon",
    "load_amazon": "trl_flower.data.amazon",
    "default_data_root": "trl_flower.data.amazon",
    "resolve_dataset_dir": "trl_flower.data.amazon",
    "select_rows": "trl_flower.data.amazon",
    "PopularityGroups": "trl_flower.data.popularity",
    "popularity_groups": "trl_flower.data.popularity",
    "popularity_from_histories": "trl_flower.data.popularity",
    "history_title_counts": "trl_flower.data.popularity",
    "history_item_counts": "trl_flower.data.popularity",
    "PromptBuilder": "trl_flower.data.prompts",
    "reference_prompt": "trl_flower.data.prompts",
    "history_free_prompt": "trl_flower.data.prompts",
    "category_words": "trl_flower.data.prompts",
    "check_prompt_tokenization": "trl_flower.data.prompts",
    "prepare_amazon": "trl_flower.data.prepare",
    "load_target": "trl_flower.data.targets",
}

__getattr__, __all__ = lazy_exports(__name__, _LAZY)
