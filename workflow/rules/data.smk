# The image folder: the embedded demo set (synthesize) and its validated manifest (prepare).


if SYNTHETIC:

    rule synthesize:
        output:
            directory(f"{R}/data"),
        params:
            stage=stage_params("synthesize"),
        log:
            f"{R}/logs/synthesize.log",
        conda:
            "../../environment.yml"
        shell:
            digit("synthesize --out {output:q}")


rule prepare:
    input:
        data=DATA,
    output:
        directory(f"{R}/prepare"),
    params:
        stage=stage_params("prepare"),
    log:
        f"{R}/logs/prepare.log",
    conda:
        "../../environment.yml"
    shell:
        digit("prepare --data {input.data:q} --out {output:q}")
