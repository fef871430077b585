"""streamload."""
