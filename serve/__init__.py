"""online-llm serving package."""
