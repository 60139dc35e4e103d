# vlalign: data -> features -> staged training -> evaluation -> DuckDB -> tables.
# Thin on purpose: config + validation + rule families live in workflow/rules/*.smk.
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


# The embedded default, unless recipes are given with --configfile: those replace it (merged in
# order) rather than being merged onto it, so a recipe never inherits the synthetic world.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/backbones.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/recaption.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/results.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
