"""forgetting.corpora: text sources (files, JSONL, Hugging Face datasets) and offline corpora generated from a seed
in seconds (the paper's toy tasks and synthetic languages)."""
