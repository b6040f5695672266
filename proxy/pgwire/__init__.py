"""Sans-IO PostgreSQL v3 wire protocol codec: no asyncio import anywhere in this package."""
