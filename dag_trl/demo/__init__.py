"""The offline demo: the built-in shapes text-to-image model, its reward and prompt sets and its ``dag-trl train``
preset (``builtin:shapes``)."""
