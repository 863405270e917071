"""The model: presets (sizes), gpt (megatron GPTModel, specs, heads), build (the one assembly), losses."""
