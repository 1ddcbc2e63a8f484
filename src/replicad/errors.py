"""One exception tree: every error carries its message, its CLI exit code, whether
retrying can help (transient) or an operator must act (permanent), and — for the few a peer
acts on — its code (``ErrorCode``)."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """The ``code`` of an error answer that the other side acts on (docs/protocol.md). The
    values travel on the wire and must not change; any other error's code is its class name
    in lower case (``conflict``, ``refused``, …: ``answer_code``)."""

    RESYNC = "resync"              # the replica cannot apply the log on its copy: resynchronize
    FAILED_OVER = "failedover"     # the replica copy failed over: what an unplanned reverse needs to hear
    WRONG_LISTENER = "wrong_listener"  # the port is the other authentication mode's listener (local only)

    @classmethod
    def of(cls, value: object) -> ErrorCode | None:
        """The code a peer's answer names, or None for any other (an untrusted string)."""
        for code in cls:
            if value == code.value:
                return code
        return None


class ReplicadError(Exception):
    """Base of every expected failure. ``str(e)`` is the one line an operator sees.
    ``transient`` (whether another attempt can help) is the class's unless the constructor
    says otherwise for this one error."""

    exit_code = 1
    transient = False
    http_status = 400
    code: ErrorCode | None = None

    def __init__(self, message: str, *, hint: str | None = None, transient: bool | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(ReplicadError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = 2


class UsageError(ReplicadError):
    exit_code = 2


class NotFound(ReplicadError):
    http_status = 404


class Conflict(ReplicadError):
    """The request does not fit the current state (e.g. enabling twice)."""

    http_status = 409


class Refused(ReplicadError):
    """Authorization refused: the peer is authenticated but not allowed."""

    http_status = 403


class AuthenticationFailed(ReplicadError):
    http_status = 401


class DaemonUnreachable(ReplicadError):
    exit_code = 3
    transient = True


class PeerUnreachable(ReplicadError):
    """The replica server could not be reached (connection refused, timeout)."""

    transient = True
    http_status = 502


def no_such_host(name: str, reason: str) -> PeerUnreachable:
    """A peer's name that does not resolve (``reason``: the resolver's words)."""
    return PeerUnreachable(f"no such host: {name} ({reason.lower()})",
                           hint="add it to DNS or /etc/hosts, or map it to an address in the config's `resolve`")


def local_error(e: OSError) -> ReplicadError:
    """A local I/O failure while building a log (disk unreadable, state_dir full): the
    primary reports it as its own, not as the network's (primary/producer.py, and the log
    sender, transport/client.py, for what the producer raises while the log is sent)."""
    where = f" {e.filename}" if e.filename else ""
    return ReplicadError(f"local I/O error{where}: {e.strerror or e}", transient=True)


class PeerError(ReplicadError):
    """The peer answered with an error; ``transient`` follows its status, ``code`` is the
    answer's when it is one this side acts on (``ErrorCode.of``)."""

    def __init__(self, message: str, *, status: int, transient: bool, code: ErrorCode | None = None):
        super().__init__(message, transient=transient)
        self.status = status
        self.code = code


def answer_code(e: ReplicadError) -> str:
    """The ``code`` of the error answer a peer gets for ``e`` (docs/protocol.md): its
    ErrorCode, or its class name in lower case. A peer's own error relayed (PeerError) is
    named as such, as it always was."""
    if e.code is not None and not isinstance(e, PeerError):
        return e.code.value
    return type(e).__name__.lower()


class WireError(ReplicadError):
    """A change log is malformed, truncated or corrupt. Nothing of it may be applied."""

    transient = True
    http_status = 400


class ResyncRequired(ReplicadError):
    """The replica cannot apply this log on top of its copy (gap, fork, lost baseline)."""

    http_status = 409
    code = ErrorCode.RESYNC


class ResyncHeld(ResyncRequired):
    """A resync would overwrite changes made on the replica: it waits for the operator
    (primary/resync.py; the primary stays WaitingForStartResynchronize with a hold)."""


class FailedOver(Conflict):
    """The replica copy has failed over: it takes no more logs (code ``failedover``: the
    primary records that its replica said so, the condition for an unplanned reverse)."""

    code = ErrorCode.FAILED_OVER

    @classmethod
    def of(cls, vm_name: str) -> FailedOver:
        """The refusal of anything a primary sends for a failed-over copy (a log, a resync's
        digests request): one wording and one code, whichever the primary asked."""
        return cls(f"{vm_name} has failed over on this replica server; it takes no more logs",
                   hint="reverse replication from the replica, or stop the failover there")


class ResumeRefused(Conflict):
    """A resumed initial copy that does not match the replica's durable progress."""


class TransferStalled(ReplicadError):
    """A peer went silent in the middle of a request (idle timeout): worth another attempt."""

    transient = True
    http_status = 408


class Busy(ReplicadError):
    """The peer already uses what it may use of this host at once (429): try again soon."""

    transient = True
    http_status = 429


class StorageError(ReplicadError):
    """Local storage failed (disk full, I/O error)."""

    transient = True
    http_status = 507


class StateWriteFailed(ReplicadError):
    """The state database could not be written; nothing of that write was kept (catalog.py)."""

    transient = True
    http_status = 503


class ProducerFailed(Exception):
    """The log's producer failed (a local disk error) while the log was sent: reported as
    itself, not as the network (transport/bulk.py raises it, transport/client.py unwraps it).
    Not a ReplicadError: it only carries ``error`` across the sender's thread."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error
