"""Setting a node up: apply a validated config under a root directory (wizard, preset and CLI share it).

Nothing here imports Textual or the model runtime; the wizard calls these functions from its workers.
"""
