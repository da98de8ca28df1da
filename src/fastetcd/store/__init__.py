"""Durable stores behind the engine: embedded (SQLite) and Azure Cosmos DB."""
