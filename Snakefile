# The symmetry pipeline: train -> extract -> metric cache -> figures, locally or on SLURM.
#   snakemake --cores all                      the embedded default studies (config/config.yaml)
#   snakemake --profile profiles/slurm results/fig6.pdf
#   snakemake -n / --dag / --rulegraph         the plan, before anything runs
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless a config is given (--configfile replaces it, never merges).
if not config:

    configfile: "config/config.yaml"



report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/train.smk"
include: "rules/mechanics.smk"
include: "rules/masks.smk"
include: "rules/teleport.smk"
include: "rules/modelsym.smk"
include: "rules/recovery.smk"
include: "rules/plots.smk"
include: "rules/claims.smk"


rule all:
    input:
        PLAN.targets(),
    default_target: True
