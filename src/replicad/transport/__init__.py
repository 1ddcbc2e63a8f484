"""Peer HTTP: the replica's routes and the primary's client."""
