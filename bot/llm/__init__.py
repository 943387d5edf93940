"""The LLM side: the OpenAI-compatible streaming client and the API key pool."""
