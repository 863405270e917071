"""Tokenizers: core (our SentencePiece models, ChatGLM3, the chat format), hf_folder (the one writer of HF tokenizer
folders), training (SentencePiece training)."""
