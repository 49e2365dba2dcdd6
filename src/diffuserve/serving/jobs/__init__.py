"""Asynchronous jobs: kept in a database, run through the scheduler, announced by signed webhooks."""
