"""The hub: the API clients call, the /gridhub endpoint workers dial, the scheduler."""
