"""Database layer: the web app's tables as they are, the worker's own tables, and what loads
and saves them (`db.jobs`, `db.photos`, `db.trips`, `db.status`), called with a Session. It
decides nothing: the rules are worker/'s, the order of a write is `tasks.write`'s."""
