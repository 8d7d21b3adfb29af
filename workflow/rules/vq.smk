# The pixel tokenizer: a VQ autoencoder trained on the images (or a pretrained one converted from its
# file, vq.weights: file: MAGE's VQGAN, no training), and the VQ token cache, made as the
# discriminative one (tokenizer.smk): tokenize.shards independent shard jobs over the same images and
# views (a killed job redoes only its shard), merged into one cache.


if config["vq"]["weights"] == "file":

    rule import_vq:
        input:
            f"{R}/prepare",
        output:
            directory(f"{R}/vq"),
        params:
            stage=stage_params("train_vq"),
        log:
            f"{R}/logs/import_vq.log",
        conda:
            "../../environment.yml"
        shell:
            digit("train-vq --manifest {input:q}/manifest.json --out {output:q}")

else:

    rule train_vq:
        input:
            f"{R}/prepare",
        output:
            directory(f"{R}/vq"),
        localrule: True  # it trains here, or submits the training and waits (common.smk: launch)
        params:
            stage=stage_params("train_vq"),
            launch=launch("train_vq"),
        log:
            f"{R}/logs/train_vq.log",
        conda:
            "../../environment.yml"
        shell:
            digit("train-vq --manifest {input:q}/manifest.json --out {output:q} {params.launch}")


rule tokenize_vq_shard:
    input:
        prepare=f"{R}/prepare",
        vq=f"{R}/vq",
    output:
        temp(directory(f"{R}/vq_token_shards/{{shard}}")),
    wildcard_constraints:
        shard=r"\d+",
    params:
        stage=stage_params("tokenize_vq"),
    log:
        f"{R}/logs/tokenize_vq_shard_{{shard}}.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            "tokenize-vq-shard --manifest {input.prepare:q}/manifest.json "
            "--vq {input.vq:q} --shard {wildcards.shard} --out {output:q}"
        )


rule tokenize_vq:
    input:
        expand(f"{R}/vq_token_shards/{{shard}}", shard=range(config["tokenize"]["shards"])),
    output:
        directory(f"{R}/vq_tokens"),
    params:
        stage=stage_params("tokenize_vq"),
        shards=lambda wildcards, input: os.path.dirname(input[0]),
    log:
        f"{R}/logs/tokenize_vq.log",
    conda:
        "../../environment.yml"
    shell:
        digit("tokenize-vq --shards {params.shards:q} --out {output:q}")
