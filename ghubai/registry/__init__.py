"""The registry: the list of hubs, from a TOML file it watches."""
