# The two transformers: stage 1 (discriminative tokens, or VQ tokens in the VQ-token baseline) and
# stage 2 (discriminative -> VQ tokens), trained or converted from DiGIT's released checkpoints
# (stage{1,2}.weights: file), and the linear probe of stage 1.


if STAGE1_FILE:

    rule import_stage1:
        input:
            prepare=f"{R}/prepare",
            codebook=f"{R}/codebook",
        output:
            directory(f"{R}/stage1"),
        params:
            stage=stage_params("import_stage1"),
            checkpoint=config["stage1"]["weights_file"],  # a weights file: not a rule input
        log:
            f"{R}/logs/import_stage1.log",
        conda:
            "../../environment.yml"
        shell:
            digit(
                "import-stage1 --checkpoint {params.checkpoint:q} --manifest {input.prepare:q}/manifest.json "
                "--codebook {input.codebook:q} --out {output:q}"
            )

else:

    rule train_ar:
        input:
            STAGE1_TOKENS,
        output:
            directory(f"{R}/stage1"),
        localrule: True  # it trains here, or submits the training and waits (common.smk: launch)
        params:
            stage=stage_params("train_ar"),
            launch=launch("train_ar"),
        log:
            f"{R}/logs/train_ar.log",
        conda:
            "../../environment.yml"
        shell:
            digit("train-ar --tokens {input:q} --out {output:q} {params.launch}")


if STAGE2_FILE:

    rule import_stage2:
        input:
            codebook=f"{R}/codebook",
            vq=f"{R}/vq",
        output:
            directory(f"{R}/stage2"),
        params:
            stage=stage_params("import_stage2"),
            checkpoint=config["stage2"]["weights_file"],  # a weights file: not a rule input
        log:
            f"{R}/logs/import_stage2.log",
        conda:
            "../../environment.yml"
        shell:
            digit(
                "import-stage2 --checkpoint {params.checkpoint:q} --codebook {input.codebook:q} "
                "--vq {input.vq:q} --out {output:q}"
            )

else:

    rule train_decoder:
        input:
            tokens=f"{R}/tokens",
            vq_tokens=f"{R}/vq_tokens",
        output:
            directory(f"{R}/stage2"),
        localrule: True  # it trains here, or submits the training and waits (common.smk: launch)
        params:
            stage=stage_params("train_decoder"),
            launch=launch("train_decoder"),
        log:
            f"{R}/logs/train_decoder.log",
        conda:
            "../../environment.yml"
        shell:
            digit(
                "train-decoder --tokens {input.tokens:q} --vq-tokens {input.vq_tokens:q} --out {output:q} "
                "{params.launch}"
            )


rule probe:
    input:
        stage1=f"{R}/stage1",
        tokens=STAGE1_TOKENS,
    output:
        directory(f"{R}/probe"),
    params:
        stage=stage_params("probe"),
    log:
        f"{R}/logs/probe.log",
    conda:
        "../../environment.yml"
    shell:
        digit("probe --stage1 {input.stage1:q} --tokens {input.tokens:q} --out {output:q}")
