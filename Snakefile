# DiGIT end to end: images -> discriminative tokens -> stage-1 GPT -> stage-2 decoder -> pixels -> metrics.
#   snakemake                                          # the CPU demo (workflow/profiles/default)
#   snakemake --configfile config/imagenet-base.yaml   # another experiment
#   snakemake --profile workflow/profiles/slurm ...    # on a SLURM cluster
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/vq.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/diagnostics.smk"


rule all:
    input:
        REPORT_OUTPUTS,
        STABILITY_OUTPUTS,
    default_target: True
