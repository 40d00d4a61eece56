"""Serving: each model's llama-server (llamaserver), this node's models as upstreams (local), and the
router the API streams through, to a local model or a peer alike."""
