# Samples, their metrics against the val images (FID, IS, GAN-test, CAS), the upper bound, and the
# experiment's report.


rule sample_shard:
    input:
        stage1=f"{R}/stage1",
        vq=f"{R}/vq",
        **STAGE2,
    output:
        temp(directory(f"{R}/sample_shards/{{shard}}")),
    wildcard_constraints:
        shard=r"\d+",
    params:
        stage=stage_params("sample"),
    log:
        f"{R}/logs/sample_shard_{{shard}}.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            f"sample-shard --stage1 {{input.stage1:q}} {STAGE2_FLAG}--vq {{input.vq:q}} "
            "--shard {wildcards.shard} --out {output:q}"
        )


rule sample:
    input:
        expand(f"{R}/sample_shards/{{shard}}", shard=range(config["sample"]["shards"])),
    output:
        directory(f"{R}/samples"),
    params:
        stage=stage_params("sample"),
        shards=lambda wildcards, input: os.path.dirname(input[0]),
    log:
        f"{R}/logs/sample.log",
    conda:
        "../../environment.yml"
    shell:
        digit("sample --shards {params.shards:q} --out {output:q}")


# GAN-test's classifier: trained on the real train images, or a pretrained one read from its file
# (classifier.weights: file) and scored on the val images, not trained.
if config["classifier"]["weights"] == "file":

    rule import_classifier:
        input:
            f"{R}/prepare",
        output:
            directory(f"{R}/classifier"),
        params:
            stage=stage_params("train_classifier"),
        log:
            f"{R}/logs/import_classifier.log",
        conda:
            "../../environment.yml"
        shell:
            digit("train-classifier --manifest {input:q}/manifest.json --out {output:q}")

else:

    rule train_classifier:
        input:
            f"{R}/prepare",
        output:
            directory(f"{R}/classifier"),
        params:
            stage=stage_params("train_classifier"),
        log:
            f"{R}/logs/train_classifier.log",
        conda:
            "../../environment.yml"
        shell:
            digit("train-classifier --manifest {input:q}/manifest.json --out {output:q}")


# CAS: a classifier trained on the samples, scored on the real val images (none for unconditional samples).
rule cas:
    input:
        samples=f"{R}/samples",
        prepare=f"{R}/prepare",
    output:
        directory(f"{R}/cas"),
    params:
        stage=stage_params("cas"),
    log:
        f"{R}/logs/cas.log",
    conda:
        "../../environment.yml"
    shell:
        digit("cas --samples {input.samples:q} --manifest {input.prepare:q}/manifest.json --out {output:q}")


rule evaluate:
    input:
        samples=f"{R}/samples",
        prepare=f"{R}/prepare",
        **CLASSIFIER,
    output:
        directory(f"{R}/evaluate"),
    params:
        stage=stage_params("evaluate"),
    log:
        f"{R}/logs/evaluate.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            "evaluate --samples {input.samples:q} --manifest {input.prepare:q}/manifest.json "
            f"{CLASSIFIER_FLAG}--out {{output:q}}"
        )


rule upper_bound:
    input:
        prepare=f"{R}/prepare",
        vq=f"{R}/vq",
        **({} if VQ_BASELINE else {"tokens": f"{R}/tokens"} | STAGE2),
    output:
        directory(f"{R}/upper_bound"),
    params:
        stage=stage_params("upper_bound"),
    log:
        f"{R}/logs/upper_bound.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            f"upper-bound --manifest {{input.prepare:q}}/manifest.json {TOKENS_FLAG}{STAGE2_FLAG}"
            "--vq {input.vq:q} --out {output:q}"
        )


rule report:
    input:
        evaluate=f"{R}/evaluate",
        upper_bound=f"{R}/upper_bound",
        stage1=f"{R}/stage1",
        vq=f"{R}/vq",
        samples=f"{R}/samples",
        **STAGE2,
        **CAS_INPUT,
        **PROBE_INPUT,
    output:
        REPORT_OUTPUTS,
    params:
        stage=stage_params("report"),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{R}/logs/report.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            f"report --evaluate {{input.evaluate:q}} {CAS_FLAG}{PROBE_FLAG}--upper-bound {{input.upper_bound:q}} "
            f"--stage1 {{input.stage1:q}} {STAGE2_FLAG}"
            "--vq {input.vq:q} --samples {input.samples:q} --out {params.out:q}"
        )
