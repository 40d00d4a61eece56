"""The household page: chat, the household's nodes, models and API keys in any browser on the LAN.

``routes`` serves the built page (``static/``, made by ``ci/page`` from ``web/``) at ``/`` on the API's
port and the JSON endpoints it calls; ``signin`` keeps the admin password hash, sessions and the sign-in
rate limit; ``views`` gathers what the page shows from the router, the mesh, the store and the hardware.
"""
