"""The proxy: health-checked, model-aware routing over hubs (a conversation stays on its hub), on h11."""
