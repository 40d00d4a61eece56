"""The first-boot wizard (Textual). It calls hearth's library, never the model runtime."""
