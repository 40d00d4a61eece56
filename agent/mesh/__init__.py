"""The household mesh: node identity, household trust, signed requests, discovery, peers and routing.

Importing this package (or identity/household/auth) pulls in no zeroconf, FastAPI or httpx, so the
first-boot wizard can call the household functions cheaply; service.py, discovery.py and api.py import
those on their own.
"""

PROTOCOL_VERSION = 1
"""The mesh protocol version carried in mDNS TXT and in /mesh/v1/hello."""

SERVICE_TYPE = "_hearth._tcp.local."
"""DNS-SD service type every Hearth node registers and browses."""
