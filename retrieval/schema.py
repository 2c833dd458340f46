"""The version of robret's JSON outputs (`robret query --json`, `robret attack --json`, `robret dedup`,
the HTTP service). Every JSON document robret prints carries `"schema": SCHEMA_VERSION`; the fields are
documented in docs/json.md. Bump the minor number when fields are added, the major one when a field
changes meaning or disappears."""
SCHEMA_VERSION = "robret.v2"
