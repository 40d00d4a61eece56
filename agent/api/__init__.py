"""The node's HTTP API: OpenAI-compatible /v1, an Ollama subset, /health, /metrics, API keys.

``create_app(runtime)`` in ``app`` builds it; ``runtime.Runtime`` is what it needs from the node.
"""
