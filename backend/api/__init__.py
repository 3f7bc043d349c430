"""The HTTP API (FastAPI): OpenAI's fine-tuning dialect plus safetrain's own routes."""
