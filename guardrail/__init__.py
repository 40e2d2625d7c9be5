"""guardrail: feature-level monitoring and control of tool-using LLM agents."""
__version__ = "0.1.0"
