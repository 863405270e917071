"""The model: presets (the size table), build (the one assembly: config, chunks), gpt (megatron GPTModel, layer
specs, the LM and reward heads), losses."""
