"""The configuration model, its loading and the demo configuration."""
