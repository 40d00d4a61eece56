"""A/B image updates: signed release files, where they come from, and what the booted node does with them.

The files of one release (see README, "Updates"): ``hearth_V.efi`` (the UKI), ``hearth_V.usr.UUID.raw.xz``
and ``hearth_V.usr-verity.UUID.raw.xz`` (the /usr slot and its verity hash tree), listed with their
SHA-256 in ``SHA256SUMS`` and signed in ``SHA256SUMS.gpg`` by the project's key. A node downloads them
once (from a URL or a household peer), checks them with gpgv, keeps them under
``/var/lib/hearth/updates/verified`` for its peers, and hands them to systemd-sysupdate.
"""
