"""The embedded default: `python -m tinyllm_mcore.quickstart` runs the whole pipeline on a synthetic Chinese knowledge
corpus (corpus -> tokenizer -> preprocess -> TP2 pretrain -> SFT -> DPO -> reward model -> held-out evaluation -> HF
export -> chat)."""
