"""megatron-core <-> Hugging Face conversion.

mapping       the parameter table: each megatron tensor, the HF tensors it is made of, and the transform between them
hf_config     HF config.json <-> ModelPreset; generation_config.json
hf_weights    reading HF safetensors / pytorch_model.bin safely
hf_folder     writing an HF model directory (weights, configs, tokenizer files)
mcore_model   the whole model in one CPU process (checkpoints go through checkpoint.io)
output        staged (all-or-nothing) output directories, the progress printer
to_mcore      convert_hf_to_mcore;  to_hf: convert_mcore_to_hf  (CLIs: tinyllm_mcore.cli.hf_to_mcore / mcore_to_hf)
"""
from tinyllm_mcore.convert.to_hf import convert_mcore_to_hf
from tinyllm_mcore.convert.to_mcore import convert_hf_to_mcore

__all__ = ["convert_hf_to_mcore", "convert_mcore_to_hf"]
