"""Training data: records from files or datasets, prompt templates, chat label masks, tokenizing and batching."""
