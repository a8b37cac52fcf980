"""An Ollama-compatible engine simulator for tests, benchmarks and the demo."""
