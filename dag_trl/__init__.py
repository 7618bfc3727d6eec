"""dag_trl: GFlowNet alignment of text-to-image diffusion models (DAG and DAG-KL, Zhang et al. 2024, arXiv 2406.00633)."""

__version__ = "0.1.0.dev0"
