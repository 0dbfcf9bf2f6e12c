"""Runnable examples of automation with the SDK (each has a `main()`)."""
