# The two transformers: stage 1 (discriminative tokens, or VQ tokens in the VQ-token baseline) and
# stage 2 (discriminative -> VQ tokens), and the linear probe of stage 1.


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
