"""robret.index: FAISS index on the unit sphere with a SQLAlchemy catalog; folder ingestion."""
