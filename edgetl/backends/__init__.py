"""Framework backends. Each is imported only by the stage that needs it; they never import each other."""
