"""The target service: the large model that verifies a block of draft tokens in one pass."""
