# Config, paths and the command every rule runs. The library (digit/) knows nothing of Snakemake.
import os
import shlex

from snakemake_interface_storage_plugins.io import WILDCARD_REGEX

from digit.runtime.config import ConfigError, check_feasible, load_config
from digit.stages import code_sha256, config_subset


def read_config(path):
    """The experiment config as digit reads it (strict YAML, the schema), or a WorkflowError that names
    the file and the line or key."""
    try:
        return load_config(path)
    except ConfigError as e:
        raise WorkflowError(str(e)) from None


# Snakemake has read a --configfile with its own reader before this file runs (and evaluated it, if it
# is a YTE template); the default is read by digit first. Either way digit's reader and schema check
# the file before the workflow uses any value of it.
if not workflow.configfiles:
    read_config("config/config.yaml")
    configfile: "config/config.yaml"
if len(workflow.configfiles) != 1:
    raise WorkflowError(
        "give one experiment config with --configfile "
        f"(got {len(workflow.configfiles)}: {workflow.configfiles})"
    )
# Relative to the working directory where the config lies inside it: the shell commands (and with
# them Snakemake's code-change trigger) stay the same when the directory is moved or copied.
CONFIGFILE = str(workflow.configfiles[0])
if os.path.abspath(CONFIGFILE).startswith(os.path.join(os.getcwd(), "")):
    CONFIGFILE = os.path.relpath(CONFIGFILE)
if read_config(CONFIGFILE) != config:
    raise WorkflowError(
        f"--config overrides are not supported: the config Snakemake holds differs from {CONFIGFILE}, "
        "which every stage reads; edit the file or copy it to a new experiment config"
    )
# Values that would fail hours into a run stop it before the first job, naming the key. Planning
# (-n) checks the values alone; a run also checks the data, weight files and, for jobs run here, a GPU.
check_feasible(config, CONFIGFILE, machine=False)


onstart:
    check_feasible(config, CONFIGFILE, gpu=workflow.local_exec)


R = f"results/{config['experiment']}"
SYNTHETIC = config["data"]["source"] == "synthetic"
DATA = f"{R}/data" if SYNTHETIC else config["data"]["root"]

# An input path has no escape for braces: Snakemake would take {name} in the image folder for a wildcard.
if not SYNTHETIC and WILDCARD_REGEX.search(DATA):
    raise WorkflowError(
        f"key 'data.root': {DATA!r} holds {{...}}, which Snakemake reads as a wildcard in an input path; "
        "give the folder (or a link to it) a path without braces"
    )
# Released weights (README: Released weights): centroids, stage 1 and stage 2 converted, not trained.
KMEANS_FILE = config["kmeans"]["weights"] == "file"
STAGE1_FILE = config["stage1"]["weights"] == "file"
STAGE2_FILE = config["stage2"]["weights"] == "file"
# The paper's VQ-token baseline (stage1.tokens: vq): stage 1 learns the VQ tokens, which the VQ
# decoder renders; there is no stage 2.
VQ_BASELINE = config["stage1"]["tokens"] == "vq"
STAGE1_TOKENS = f"{R}/vq_tokens" if VQ_BASELINE else f"{R}/tokens"
STAGE2 = {} if VQ_BASELINE else {"stage2": f"{R}/stage2"}  # the stage-2 input of the rules that decode
STAGE2_FLAG = "" if VQ_BASELINE else "--stage2 {input.stage2:q} "
TOKENS_FLAG = "" if VQ_BASELINE else "--tokens {input.tokens:q} "  # the upper bound's discriminative tokens
# The linear probe runs stage 1 without its class: on an unconditional model, or on the null class of
# one trained with class dropout (the paper probes its unconditional models). Other models get none.
# probe.enabled: false leaves it out (a training-free evaluation of released weights).
PROBE = config["probe"]["enabled"] and (
    not config["stage1"]["class_conditional"] or config["stage1"]["class_dropout"] > 0
)
# GAN-test needs a classifier of the real images (trained, or pretrained: classifier.weights: file), CAS
# one trained on the samples (the cas rule): classifier.enabled: false leaves all of them out.
CLASSIFIER = {"classifier": f"{R}/classifier"} if config["classifier"]["enabled"] else {}
CLASSIFIER_FLAG = "--classifier {input.classifier:q} " if CLASSIFIER else ""
CAS_INPUT = {"cas": f"{R}/cas"} if config["classifier"]["enabled"] else {}
CAS_FLAG = "--cas {input.cas:q} " if CAS_INPUT else ""
PROBE_INPUT = {"probe": f"{R}/probe"} if PROBE else {}
PROBE_FLAG = "--probe {input.probe:q} " if PROBE else ""
REPORT_OUTPUTS = [f"{R}/metrics.json", f"{R}/grid.png", f"{R}/report.json"] + [
    f"{R}/curves/{name}.tsv"
    for name in ("vq", "stage1", *([] if VQ_BASELINE else ["stage2"]), *(["probe"] if PROBE else []))
]
STABILITY_OUTPUTS = [f"{R}/stability/stability.{ext}" for ext in ("tsv", "png", "json")]

def stage_params(stage):
    """What a stage's outputs depend on besides its inputs, as a Snakemake param (the re-run trigger):
    its config keys and its code's hashes (digit/stages.py, which dvc.yaml's params and deps mirror)."""
    return {"config": config_subset(config, stage), "code": code_sha256(stage)}


def digit(arguments):
    """The shell command of a stage: the digit CLI on this experiment's config, logged."""
    return (
        "OMP_NUM_THREADS={threads} digit "
        + arguments
        + f" --config {shell_literal(CONFIGFILE)} > {{log:q}} 2>&1"
    )


def shell_literal(value):
    """`value` as one shell word inside a rule's shell string: quoted, and its braces doubled, since
    Snakemake formats the string and would fill in {...} (breaking the quoting) otherwise."""
    return shlex.quote(str(value)).replace("{", "{{").replace("}", "}}")


# The training rules' `digit --launcher` flags, from the rule's resources in the profile:
# launcher (slurm | local: a submitit job, which this local rule waits for), nodes, gpus_per_node,
# tasks_per_node, cpus_per_task, mem_mb, runtime, slurm_partition, constraint, slurm_account,
# signal_delay_s, max_requeues. Without `launcher` the rule trains in its own process.
LAUNCH_FLAGS = {
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "tasks_per_node": "--tasks-per-node",
    "cpus_per_task": "--cpus-per-task",
    "mem_mb": "--mem-mb",
    "runtime": "--timeout-min",
    "slurm_partition": "--partition",
    "constraint": "--constraint",
    "slurm_account": "--account",
    "signal_delay_s": "--signal-delay-s",
    "max_requeues": "--max-requeues",
}


def launch(rule_name):
    def flags(wildcards, resources):
        launcher = resources.get("launcher", "direct")
        if launcher == "direct":
            if workflow.non_local_exec:
                raise WorkflowError(
                    f"{rule_name} would train on the submitting machine; give it resources "
                    "launcher: slurm (and its nodes, GPUs, partition) in the profile's set-resources"
                )
            return ""
        args = ["--launcher", launcher, "--job-dir", f"{R}/logs/{rule_name}_jobs"]
        for key, flag in LAUNCH_FLAGS.items():
            if key in resources.keys():
                args += [flag, str(resources[key])]
        return shlex.join(args)

    return flags
