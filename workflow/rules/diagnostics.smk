# Diagnostics of the tokenizers: how many of their tokens change when noise is added to an image.


rule stability:
    input:
        prepare=f"{R}/prepare",
        codebook=f"{R}/codebook",
        vq=f"{R}/vq",
    output:
        STABILITY_OUTPUTS,
    params:
        stage=stage_params("stability"),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{R}/logs/stability.log",
    conda:
        "../../environment.yml"
    shell:
        digit(
            "stability --manifest {input.prepare:q}/manifest.json --codebook {input.codebook:q} "
            "--vq {input.vq:q} --out {params.out:q}"
        )
