# The discriminative tokenizer: encoder features of a train sample, K-means codebook, token cache.


rule features:
    input:
        f"{R}/prepare",
    output:
        directory(f"{R}/features"),
    params:
        config=stage_params("features"),
    log:
        f"{R}/logs/features.log",
    conda:
        "../../environment.yml"
    shell:
        digit("features --manifest {input:q}/manifest.json --out {output:q}")


rule kmeans:
    input:
        f"{R}/features",
    output:
        directory(f"{R}/codebook"),
    params:
        config=stage_params("kmeans"),
    log:
        f"{R}/logs/kmeans.log",
    conda:
        "../../environment.yml"
    shell:
        digit("kmeans --features {input:q} --out {output:q}")


rule tokenize:
    input:
        prepare=f"{R}/prepare",
        codebook=f"{R}/codebook",
    output:
        directory(f"{R}/tokens"),
    params:
        config=stage_params("tokenize"),
    log:
        f"{R}/logs/tokenize.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            "tokenize --manifest {input.prepare:q}/manifest.json "
            "--codebook {input.codebook:q} --out {output:q}"
        )
