"""Routes by resource: tasks, segment, models, system (classes, health, readiness, metrics), console."""
