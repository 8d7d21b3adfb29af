# The discriminative tokenizer: encoder features of a train sample, K-means codebook (or released
# centroids, kmeans.weights: file), token cache.
# Extraction and tokenization run as independent shard jobs (a killed job redoes only its shard).


if KMEANS_FILE:

    rule import_centroids:
        output:
            directory(f"{R}/codebook"),
        params:
            stage=stage_params("import_centroids"),
            centroids=config["kmeans"]["weights_file"],  # a weights file, as the encoder's: not a rule input
        log:
            f"{R}/logs/import_centroids.log",
        conda:
            "../../environment.yml"
        shell:
            digit("import-centroids --centroids {params.centroids:q} --out {output:q}")

else:

    rule features_shard:
        input:
            f"{R}/prepare",
        output:
            directory(f"{R}/features/{{shard}}"),
        wildcard_constraints:
            shard=r"\d+",
        params:
            stage=stage_params("features"),
        log:
            f"{R}/logs/features_shard_{{shard}}.log",
        conda:
            "../../environment.yml"
        shell:
            digit("features-shard --manifest {input:q}/manifest.json --shard {wildcards.shard} --out {output:q}")


    rule features:
        input:
            expand(f"{R}/features/{{shard}}", shard=range(config["kmeans"]["feature_shards"])),


    rule kmeans:
        input:
            rules.features.input,
        output:
            directory(f"{R}/codebook"),
        params:
            stage=stage_params("kmeans"),
            features=lambda wildcards, input: os.path.dirname(input[0]),
        log:
            f"{R}/logs/kmeans.log",
        conda:
            "../../environment.yml"
        shell:
            digit("kmeans --features {params.features:q} --out {output:q}")


rule tokenize_shard:
    input:
        prepare=f"{R}/prepare",
        codebook=f"{R}/codebook",
    output:
        temp(directory(f"{R}/token_shards/{{shard}}")),
    wildcard_constraints:
        shard=r"\d+",
    params:
        stage=stage_params("tokenize"),
    log:
        f"{R}/logs/tokenize_shard_{{shard}}.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            "tokenize-shard --manifest {input.prepare:q}/manifest.json "
            "--codebook {input.codebook:q} --shard {wildcards.shard} --out {output:q}"
        )


rule tokenize:
    input:
        expand(f"{R}/token_shards/{{shard}}", shard=range(config["tokenize"]["shards"])),
    output:
        directory(f"{R}/tokens"),
    params:
        stage=stage_params("tokenize"),
        shards=lambda wildcards, input: os.path.dirname(input[0]),
    log:
        f"{R}/logs/tokenize.log",
    conda:
        "../../environment.yml"
    shell:
        digit("tokenize --shards {params.shards:q} --out {output:q}")
