"""The offline demo: the built-in shapes text-to-image model, its reward and prompt sets, and the ``dag-trl`` CLI."""
