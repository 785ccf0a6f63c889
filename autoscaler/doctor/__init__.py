"""`autoscaler doctor`: live, read-only checks of a Django/Celery/Redis/Docker stack for the seed's outages.

Reading (talks to things, reads only): broker.read_broker, containers.EngineReader, workers.read_workers,
postgres.read_postgres; judging (pure, total over any input): the *_findings functions of broker,
networking, drift, memory, routing and postgres; runner.run_doctor ties them; output renders.
"""
