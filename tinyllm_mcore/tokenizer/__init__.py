"""Tokenizers: core (our SentencePiece models, ChatGLM3, the chat format), hf_folder (the one HF tokenizer-folder writer), training (SentencePiece training)."""
