"""patchd's ML core (torch): data, models, features, evaluation. Imported by workers only."""
