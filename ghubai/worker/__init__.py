"""The worker: dials out to hubs and runs their requests on the local engine."""
