"""The wizard's screens, one module each, in the order the person meets them."""
