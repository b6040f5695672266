"""Operations: the server process, CLI, demo, metrics, workers."""
