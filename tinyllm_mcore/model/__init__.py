"""The model: presets (the size table), gpt (megatron GPTModel, layer specs, the LM and reward heads), losses."""
