"""banditroute: an LLM router that learns online from bandit feedback, on Ray."""

__version__ = "0.1.0"
