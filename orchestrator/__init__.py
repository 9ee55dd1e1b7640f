"""The orchestrator: the public Generator service, driving a draft and a target service."""
