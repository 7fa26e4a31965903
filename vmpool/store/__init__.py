"""Everything that speaks SQL: the asyncpg pool, migrations and named queries."""
