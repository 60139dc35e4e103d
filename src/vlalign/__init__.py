"""vlalign: staged vision-language alignment as a reproducible Snakemake pipeline."""

__version__ = "0.1.0"
