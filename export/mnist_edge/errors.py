class EdgeError(Exception):
    """A problem with the user's input or model, with a message that says how to fix it."""
