# Figures: tables in, PDF (for papers) and PNG (for the report) out.


rule plot:
    input:
        unpack(figure_inputs),
    output:
        pdf="results/{figure}.pdf",
        png=report(
            "results/figures/{figure}.png",
            caption="../workflow/report/figure.rst",
            category=figure_study,
        ),
    log:
        "results/logs/plots/{figure}.log",
    benchmark:
        "results/benchmarks/plots/{figure}.tsv"
    params:
        spec=figure_spec,
        study=figure_study,
        kind=lambda w: figure_spec(w)["kind"],
        caption=lambda w: figure_spec(w).get("caption", w.figure),
        versions=VERSIONS,
        code=code("plot.py", register_figure=lambda w: figure_spec(w)["kind"]),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/plot.py"
