"""What several test areas share; tests of the package itself live in the area folders beside this one.

text_data          random Chinese/English text, jsonl corpora, a tiny sentencepiece tokenizer (trained once per process)
hf_tokenizer       a tiny byte-level BPE Hugging Face tokenizer folder
progression_data   a learnable arithmetic-progression dataset for training-loop tests
post_training_data the quickstart corpus, a tiny tokenizer and SFT checkpoints for the SFT/DPO/reward/inference tests
cmmlu              small CMMLU / C-Eval format CSV folders
slurm_cluster      the local two-node Slurm cluster fixture (examples/local_slurm.sh)
distributed        run_ranks: THE way a test runs code on several ranks (worker: what each rank runs)
"""
