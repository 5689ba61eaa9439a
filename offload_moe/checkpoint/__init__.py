"""Validated checkpoint reading: safetensors headers, checkpoint names, GPTQ, converted directories."""
