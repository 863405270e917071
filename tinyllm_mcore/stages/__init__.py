"""Training stages: each a Stage (datasets provider + forward step + head) and main(argv).

A stage imports training/, data/ and model/, never another stage."""
