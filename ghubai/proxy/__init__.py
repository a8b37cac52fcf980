"""The proxy: health-checked, model-aware round robin over hubs, on h11."""
