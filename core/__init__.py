"""The lowest floor: the error hierarchy, settings (the only reader of the environment), logging.

Imports nothing of the project."""
