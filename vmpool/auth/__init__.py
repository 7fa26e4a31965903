"""Who is calling (identity.md sections 2-4): credentials, principals, policy."""
