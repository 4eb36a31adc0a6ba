"""The wire contract, pure: codes, frames, ids, fields, command and disconnect tables."""
