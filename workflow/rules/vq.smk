# The pixel tokenizer: a VQ autoencoder trained on the images (or a pretrained one converted from its
# file, vq.weights: file: MAGE's VQGAN, no training), and the VQ token cache.


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


rule tokenize_vq:
    input:
        prepare=f"{R}/prepare",
        vq=f"{R}/vq",
    output:
        directory(f"{R}/vq_tokens"),
    params:
        stage=stage_params("tokenize_vq"),
    log:
        f"{R}/logs/tokenize_vq.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            "tokenize-vq --manifest {input.prepare:q}/manifest.json "
            "--vq {input.vq:q} --out {output:q}"
        )
