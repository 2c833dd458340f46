"""robret.retrieval: search with certificates, attacks on rankings, metrics, and the `robret` CLI."""
