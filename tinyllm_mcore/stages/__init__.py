"""Training stages: each a Stage (datasets provider + forward step + head) and main(argv). A stage never imports another stage."""
