"""The reports app: background work on three queues, recorded exactly once per task id."""
