"""Ingestion shared by every stage that reads a raw pool: canonical records and reject reasons
(`records`), planning into work units with pool-wide duplicate ids (`plan`), and the read stage that
turns a unit into canonical samples and per-row rejects (`read`)."""
