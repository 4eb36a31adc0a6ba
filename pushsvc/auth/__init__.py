"""Who is connecting: JWT verification and revocations."""
