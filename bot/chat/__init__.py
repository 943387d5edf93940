"""The conversation side: history, commands and the transport-agnostic conversation service."""
