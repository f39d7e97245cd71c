"""Offline data conversion (jsonl -> Megatron mmap / WebDataset) and the shared loader."""
