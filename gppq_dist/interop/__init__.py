"""Models compressed by other tools, brought into the ``.gppq`` artifact."""
