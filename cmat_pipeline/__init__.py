"""cmat: Collaborative Multi-Agent Tuning (arXiv 2404.01663) for small open language models.

Stages (one module each, shared by DVC, the `cmat` CLI and the Airflow DAGs):
prepare_model -> collect -> validate/filter/augment/distill -> sft -> cmat -> evaluate.
"""

__version__ = "0.1.0"
