"""The household pool: one model across several nodes, through llama.cpp's RPC backend.

Each node that offers memory runs llama.cpp's ``rpc-server`` on loopback (rpcserver.py) and publishes its
offer in its signed mesh state (capacity.py). A node that must serve a model no single node can hold picks
members and splits the layers by offered memory and measured speed (plan.py), then runs ``llama-server
--rpc`` over the members' endpoints and serves it like any local model (manager.py). ggml's RPC has no
authentication: a peer's rpc-server is reached only through the mesh's encrypted channel.
"""
