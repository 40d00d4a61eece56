"""The household mesh: node identity, household trust, signed requests, discovery, peers and routing.

Importing this package (or identity/household/auth) pulls in no zeroconf, FastAPI or httpx, so the
first-boot wizard can call the household functions cheaply; service.py, discovery.py and api.py import
those on their own.
"""

PROTOCOL_VERSION = 2
"""The mesh protocol version carried in mDNS TXT and in /mesh/v1/hello (2: the mesh moved onto the
household channel, mutual TLS on mesh.port; version 1 spoke signed cleartext HTTP on the API port)."""

SERVICE_TYPE = "_hearth._tcp.local."
"""DNS-SD service type every Hearth node registers and browses."""

DEFAULT_PORT = 8081
"""The household channel's default TCP port (setting mesh.port): every node-to-node byte goes through it."""
