"""replicad: asynchronous replication of disk-image files for disaster recovery."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
